"""Named runs. A recipe is a function returning a TrainConfig; command-line flags override fields."""

from cluster.config import ConfigError, TrainConfig
from stages.optim import RecordedSchedule


def alexnet_2012() -> TrainConfig:
    """ImageNet with every hyperparameter of the paper (PAPER.md §Training): batch 128, SGD with
    momentum 0.9 and weight decay 0.0005 in the paper's rule, ε = 0.01 divided by 10 on validation
    plateau at most three times, about 90 epochs, dropout 0.5, 224×224 crops of 256×256 images.
    The shards come from `python -m data.convert` (a later issue): pass --train-data/--val-data."""
    return TrainConfig(
        recipe="alexnet_2012",
        num_classes=1000, image_size=224, resize=256, dropout=0.5,
        batch_size=128, epochs=90, lr=0.01, momentum=0.9, weight_decay=0.0005,
        lr_schedule="plateau", lr_patience=2, lr_max_drops=3,
        train_data="imagenet/train-{000000..001023}.tar", val_data="imagenet/val-{000000..000049}.tar",
        run_dir="runs/alexnet_2012", log_every=20,
    )


def cuda_convnet_2012() -> TrainConfig:
    """ImageNet as the authors' released code ran it (PAPER.md, last section; layers/layers-145.cfg
    and layers/layer-params-145.cfg of AlexNet-Source-Code): the `cuda-convnet-2012` network and
    PCA noise; the biases at ε_B = 0.02 without weight decay; the run's recorded schedule (ε ÷ 10
    after epochs 25, 51 and 79; conv1's ÷ 10 and colour noise off after 67; conv1 frozen after
    72); 91 epochs. The rest is alexnet_2012's."""
    return alexnet_2012().replace(recipe="cuda_convnet_2012", variant="cuda-convnet-2012", lr_schedule="recorded",
                                  epochs=RecordedSchedule.EPOCHS, run_dir="runs/cuda_convnet_2012")


def demo() -> TrainConfig:
    """The embedded demo data (data/demo.py: ten classes cut from photographs shipped with
    scikit-image) on a 2-core CPU in under ten minutes. The paper's eight layers, widths, LRN,
    pooling, dropout, init and update rule are kept; the input is 128×128 crops of 146×146
    images (so the maps are 31/15/7/3 instead of 55/27/13/6 and fc6 reads 2·128·3·3 = 2304 values),
    batches are 32 (with the paper's init the network sits at chance for its first ~100 updates;
    smaller batches get out sooner), ε = 0.005 per 32 images (at 0.01 a run left chance, then diverged back to
    it), 20 epochs, ε divided by 10 after epoch 16."""
    return TrainConfig(
        recipe="demo",
        num_classes=10, image_size=128, resize=146, dropout=0.5,
        batch_size=32, epochs=20, lr=0.005, lr_batch=32, momentum=0.9, weight_decay=0.0005,
        lr_schedule="milestones", lr_milestones=(16,), lr_patience=2,
        train_data="demo", val_data="demo", run_dir="runs/demo", log_every=10,
        cpu_isa="avx2",  # the same figures on every x86-64 machine (README: the demo)
    )


RECIPES = {"alexnet_2012": alexnet_2012, "cuda_convnet_2012": cuda_convnet_2012, "demo": demo}


def build_config(recipe: str, **overrides) -> TrainConfig:
    if recipe not in RECIPES:
        raise ConfigError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    return RECIPES[recipe]().replace(**overrides)

"""The distributed trainer, by the process each part runs in.

    driver.py, trainer.py      the driver: the command line, the run, the training loop
    config.py, recipes.py      the configuration and the named runs
    faults.py                  fault injection for tests (every ALEXNET_INJECT_* variable)
    export.py, report.py       commands: `python -m cluster.export`, `python -m cluster.report`
    evaluate.py, predict.py,   commands after training: `python -m cluster.evaluate` (on the mesh or
    infer.py                   in one process), `cluster.predict` (images), `cluster.infer` (Ray Data)
    experiments.py             command: `python -m cluster.experiments` (the paper's ablations)
    argtypes.py                the commands' shared argparse types
    plan/                      pure arithmetic, no Ray and no processes: the mesh, pipeline schedules,
                               the placement rule, gradient buckets, the scaling model
    rank/                      what runs inside each actor: the worker, its pipeline stage, the tower
                               exchange, the gradient all-reduce, its rendezvous and its reports
    launch/                    Ray: the actor mesh, placement groups, the session and loopback setup
    ckpt/                      checkpoints: format, storage (paths and URIs), the checkpointer, the
                               run-dir check, consolidation for export
    telemetry/                 on the driver: step summaries, progress, metrics, history, timeline,
                               report plots, the experiments' tables and figures
    serve/                     after training: the network from an export, run or checkpoint, its
                               preprocessing and scoring, evaluation, the Ray Data inference pipeline

Imports flow one way (tests/test_imports.py): plan/ imports nothing else of cluster/; rank/, ckpt/
and telemetry/ never import launch/; only launch/, serve/ and the top level import Ray (rank/ asks
it for its node inside a function); serve/ never imports the driver.
"""

"""Where checkpoints live: a local path or a filesystem URI, the same way, through `pyarrow.fs`.

A *location* is a plain string that any process (the driver, every actor, `cluster.export`) can
reopen on its own:
- a path, relative or absolute: a local disk, or an NFS/Lustre mount that every node has at the
  same path. It goes through pyarrow's LocalFileSystem.
- a URI that `pyarrow.fs.FileSystem.from_uri` understands: `s3://bucket/prefix`,
  `gs://bucket/prefix`, `hdfs://namenode:8020/path`, `file:///path`. Its query options stay in
  the string, e.g. `s3://bucket/run?endpoint_override=127.0.0.1:9000&scheme=http`, and `join`
  puts names into the path before the query, so a checkpoint's location carries its run dir's
  options. S3 URIs also take `connect_timeout` and `request_timeout` (seconds), which pyarrow's
  URI parser lacks. Without them a silent endpoint can hold each request for over a minute.

Credentials are found where the cloud SDKs under pyarrow look, by each process for itself:
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE and ~/.aws/, instance
roles; GOOGLE_APPLICATION_CREDENTIALS and the metadata server for gs://. A URI that carries a
secret (`s3://KEY:SECRET@bucket/...`) is refused, because locations are printed and saved in
every manifest.

`Storage.write_bytes` makes a file appear whole or not at all:
- **Local:** a temporary name next to it, fsync, rename (os.replace), then fsync of the
  directory, so the rename is durable too.
- **Object stores (S3, GCS, Azure):** the final key is written directly. An object written in one
  upload appears whole or not at all: a single PUT, or a multipart upload, which is visible only
  once completed. A temporary object plus a rename would be a copy and a delete there.
- **Other filesystems (HDFS):** a temporary name, then a rename, which is atomic on HDFS.
"""

import functools
import os
import posixpath
import re
import time
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import pyarrow.fs as pafs

from cluster import faults

TMP_SUFFIX = ".tmp"  # a local or HDFS file's name while it is being written
S3_TIMEOUTS = ("connect_timeout", "request_timeout")  # seconds; S3 query options of ours
OBJECT_STORES = tuple(getattr(pafs, name) for name in ("S3FileSystem", "GcsFileSystem", "AzureFileSystem")
                      if hasattr(pafs, name))
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_LOCAL = pafs.LocalFileSystem()


def is_uri(location: str) -> bool:
    return bool(_URI.match(location))


def absolute(location: str) -> str:
    """A path made absolute (`~` expanded): actors may run in another working directory. A URI
    is returned as it is."""
    return location if is_uri(location) else os.path.abspath(os.path.expanduser(location))


def join(location: str, *names: str) -> str:
    """`location`/name/...; for a URI the names go into its path, before its query."""
    if not is_uri(location):
        return os.path.join(location, *names)
    parts = urlsplit(location)
    path = "/".join([parts.path.rstrip("/"), *(name.strip("/") for name in names)])
    return urlunsplit(parts._replace(path=path))


def parent(location: str) -> str:
    """The directory `location` is in: `s3://b/run?...` of `s3://b/run/checkpoint-00000005?...`."""
    if is_uri(location):
        parts = urlsplit(location)
        return urlunsplit(parts._replace(path=posixpath.dirname(parts.path.rstrip("/"))))
    return os.path.dirname(os.path.normpath(location))


def basename(location: str) -> str:
    """The last name of `location`'s path: `checkpoint-00000005` of `s3://b/run/checkpoint-00000005?...`."""
    if is_uri(location):
        return posixpath.basename(urlsplit(location).path.rstrip("/"))
    return os.path.basename(os.path.normpath(location))


def error_line(err: BaseException) -> str:
    """`ErrorType: the first line of its message`: pyarrow's can run to dozens of lines."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def open_storage(location: str) -> "Storage":
    """The file or directory `location` names (a path or a URI, see the module docstring). Opening
    checks the URI's form; the first operation is the first to reach the storage (except for an
    s3:// URI with neither `region` nor `endpoint_override`: pyarrow asks AWS for the bucket's
    region, and may raise OSError). Raises ValueError for an unknown scheme, a bad option or a URI
    that carries a secret."""
    if not is_uri(location):
        return Storage(location, _LOCAL, os.path.abspath(os.path.expanduser(location)))
    parts = urlsplit(location)
    if parts.password is not None:
        raise ValueError(f"{parts.scheme}:// URI carries a secret ({parts.username}:...@): locations are printed "
                         f"and saved in every manifest; give credentials by environment or config file instead")
    fs, root = _filesystem(parts.scheme, parts.netloc, parts.query)
    path = unquote(parts.path).strip("/")
    return Storage(location, fs, posixpath.join(root, path) if path else root)


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, netloc: str, query: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of `scheme://netloc/?query` and the path of its root (for S3: the bucket).
    One per process and storage: a client is made once, and for s3:// without a region or an
    endpoint pyarrow asks AWS for the bucket's region once."""
    options = parse_qsl(query, keep_blank_values=True)
    timeouts = {}
    if scheme == "s3":
        for name, value in [(n, v) for n, v in options if n in S3_TIMEOUTS]:
            try:
                timeouts[name] = float(value)
            except ValueError:
                raise ValueError(f"s3:// option {name} must be seconds, got {value!r}") from None
            if timeouts[name] <= 0:
                raise ValueError(f"s3:// option {name} must be > 0 seconds, got {value!r}")
        options = [(n, v) for n, v in options if n not in S3_TIMEOUTS]
    fs, root = pafs.FileSystem.from_uri(urlunsplit((scheme, netloc, "/", urlencode(options), "")))
    if timeouts:  # pyarrow's own options (its pickling state), plus the timeouts
        fs = pafs.S3FileSystem(**{**fs.__reduce__()[1][0], **timeouts})
    return fs, root.rstrip("/") or "/"


class Storage:
    """One file or directory: `location` (what the user gave, or a `join` of it) on `fs` at `path`."""

    def __init__(self, location: str, fs: pafs.FileSystem, path: str):
        self.location, self.fs, self.path = location, fs, path

    def __repr__(self) -> str:
        return f"Storage({self.location!r})"

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *names: str) -> str:
        return join(self.location, *names)

    def child(self, *names: str) -> "Storage":
        """The storage of `join(names)` on the same filesystem (no new client)."""
        path = os.path.join(self.path, *names) if self.local else posixpath.join(self.path, *names)
        return Storage(self.join(*names), self.fs, path)

    # --- what is there

    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        """On an object store, a prefix with objects under it (or an empty one `makedirs` made)."""
        return self._info().type == pafs.FileType.Directory

    def size(self) -> int:
        info = self._info()
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{self.location} is not a file")
        return info.size

    def listdir(self) -> list[str]:
        """The names directly inside this directory, sorted; none if it does not exist."""
        if not self.is_dir():
            return []
        return sorted(info.base_name for info in self.fs.get_file_info(pafs.FileSelector(self.path)))

    # --- reading and writing

    def read_bytes(self) -> bytes:
        # a random-access file knows its size: one read into one buffer (a stream's read() grows
        # its buffer as it goes, ~100x slower for a 100 MB object on S3)
        with self.fs.open_input_file(self.path) as f:
            return f.read()

    def open_input(self):
        """A binary file (`read(n)`), for reading a large file in blocks."""
        return self.fs.open_input_file(self.path)

    def makedirs(self) -> None:
        """Create this directory and its parents (no error if it exists). On an object store it
        leaves an empty marker object, and fails when the bucket does not exist."""
        self.fs.create_dir(self.path, recursive=True)

    def write_bytes(self, data) -> None:
        """Write `data` (bytes or a buffer) so that the file appears whole or not at all (the
        module docstring says how on each kind of storage)."""
        if self.local:
            _write_local(self.path, data)
        elif isinstance(self.fs, OBJECT_STORES):
            with self.fs.open_output_stream(self.path) as f:  # one write: the whole object or none
                f.write(data)
        else:
            tmp = self.path + TMP_SUFFIX
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, self.path)

    # --- deleting

    def delete(self) -> None:
        """Delete this file."""
        self.fs.delete_file(self.path)

    def delete_dir(self) -> None:
        """Delete this directory and everything in it."""
        self.fs.delete_dir(self.path)


def _write_maybe_slowly(f, path: str, data) -> None:
    """`f.write(data)`, or, when a test asks for it (cluster/faults.py SLOW_WRITE_ENV), half of it,
    a pause, the rest."""
    pause = faults.slow_write_pause(path)
    if pause is None:
        f.write(data)
        return
    view = memoryview(data).cast("B")
    f.write(view[:len(view) // 2])
    f.flush()
    time.sleep(pause)
    f.write(view[len(view) // 2:])


def _write_local(path: str, data) -> None:
    """Temporary name, fsync, rename, fsync of the directory: `path` is the old file or the whole
    new one, whenever the process or the machine stops."""
    tmp = path + TMP_SUFFIX
    try:
        with open(tmp, "wb") as f:
            _write_maybe_slowly(f, path, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write or the rename failed
            os.remove(tmp)
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)

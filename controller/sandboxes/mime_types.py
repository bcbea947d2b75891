"""The MIME type of a returned file, guessed from its name.

Our own table for the files data work makes comes first, so the answer does not depend on the
controller's Python version or on the host's /etc/mime.types; Python's built-in table (never
the host's files) covers the rest, and anything unknown is application/octet-stream.
"""

import mimetypes
import posixpath

OCTET_STREAM = "application/octet-stream"

_BY_EXTENSION = {
    # tables and data
    "csv": "text/csv",
    "tsv": "text/tab-separated-values",
    "json": "application/json",
    "jsonl": "application/jsonl",
    "ndjson": "application/x-ndjson",
    "parquet": "application/vnd.apache.parquet",
    "feather": "application/vnd.apache.arrow.file",
    "arrow": "application/vnd.apache.arrow.file",
    "avro": "application/avro",
    "orc": "application/x-orc",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "xls": "application/vnd.ms-excel",
    "ods": "application/vnd.oasis.opendocument.spreadsheet",
    "sqlite": "application/vnd.sqlite3",
    "sqlite3": "application/vnd.sqlite3",
    "db": "application/vnd.sqlite3",
    "pickle": "application/x-python-pickle",
    "pkl": "application/x-python-pickle",
    "joblib": "application/x-python-pickle",
    "npy": "application/x-npy",
    "npz": "application/x-npz",
    "h5": "application/x-hdf5",
    "hdf5": "application/x-hdf5",
    "hdf": "application/x-hdf5",
    "nc": "application/x-netcdf",
    # documents
    "pdf": "application/pdf",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "doc": "application/msword",
    "pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "ppt": "application/vnd.ms-powerpoint",
    "odt": "application/vnd.oasis.opendocument.text",
    "html": "text/html",
    "htm": "text/html",
    "md": "text/markdown",
    "markdown": "text/markdown",
    "txt": "text/plain",
    "log": "text/plain",
    "rst": "text/x-rst",
    "tex": "application/x-tex",
    "yaml": "application/yaml",
    "yml": "application/yaml",
    "toml": "application/toml",
    "xml": "application/xml",
    "ini": "text/plain",
    "cfg": "text/plain",
    # images
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
    "svg": "image/svg+xml",
    "bmp": "image/bmp",
    "tif": "image/tiff",
    "tiff": "image/tiff",
    "ico": "image/vnd.microsoft.icon",
    # audio and video
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "mp4": "video/mp4",
    # archives
    "zip": "application/zip",
    "tar": "application/x-tar",
    "gz": "application/gzip",
    "tgz": "application/gzip",
    "bz2": "application/x-bzip2",
    "xz": "application/x-xz",
    "zst": "application/zstd",
    "7z": "application/x-7z-compressed",
    # code and notebooks
    "py": "text/x-python",
    "ipynb": "application/x-ipynb+json",
    "js": "text/javascript",
    "css": "text/css",
    "sh": "application/x-sh",
    "sql": "application/sql",
    "r": "text/x-r",
}

# Python's built-in table only: the guess must not depend on the host's /etc/mime.types.
_BUILT_IN = mimetypes.MimeTypes(filenames=())


def guess_mime_type(path: str) -> str:
    """The MIME type for a file of this name (its last extension decides: data.csv.gz is
    application/gzip)."""
    stem, _, extension = posixpath.basename(path).rpartition(".")
    if stem and extension:  # ".bashrc" has no extension
        known = _BY_EXTENSION.get(extension.lower())
        if known is not None:
            return known
    return _BUILT_IN.guess_type(path, strict=False)[0] or OCTET_STREAM

import pytest

from controller.sandboxes.mime_types import guess_mime_type


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("report.md", "text/markdown"),
        ("out/book.xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
        ("memo.docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
        (
            "deck.pptx",
            "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        ),
        ("config.yaml", "application/yaml"),
        ("config.YML", "application/yaml"),
        ("table.parquet", "application/vnd.apache.parquet"),
        ("data.csv", "text/csv"),
        ("data.tsv", "text/tab-separated-values"),
        ("rows.jsonl", "application/jsonl"),
        ("model.pkl", "application/x-python-pickle"),
        ("arr.npy", "application/x-npy"),
        ("store.h5", "application/x-hdf5"),
        ("chart.png", "image/png"),
        ("photo.JPG", "image/jpeg"),
        ("figure.svg", "image/svg+xml"),
        ("notebook.ipynb", "application/x-ipynb+json"),
        ("data.csv.gz", "application/gzip"),
        ("pyproject.toml", "application/toml"),
        ("db.sqlite", "application/vnd.sqlite3"),
        ("page.html", "text/html"),
        ("script.py", "text/x-python"),
        ("clip.mov", "video/quicktime"),  # not in our table: Python's built-in one
        ("blob", "application/octet-stream"),
        (".bashrc", "application/octet-stream"),
        ("weird.zzz-unknown", "application/octet-stream"),
    ],
)
def test_common_data_science_files_get_their_type(path: str, expected: str) -> None:
    assert guess_mime_type(path) == expected

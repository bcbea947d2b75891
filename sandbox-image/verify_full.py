# Verification of the `full` sandbox image (profiles/full.txt).
#
# Sent as code into a running `full` sandbox: it runs as one notebook cell, so it is plain
# top-level statements, and its last expression (a dict) is the cell's value. It also runs as
# a script: `podman run --rm -i --network none localhost/petri-sandbox:full python - < THIS`.
#
# 1. every pinned distribution is installed at its pinned version (importlib.metadata),
#    except the pins sandbox-image/DEVIATIONS.md documents (DEVIATIONS below);
# 2. every listed library imports, under its import name;
# 3. one tiny real operation per area; files are written to and read back from the current
#    directory (/workspace in a sandbox) and removed afterwards.
# It prints a report, raises AssertionError listing every failure if anything failed, and
# otherwise ends with a summary dict: {'checked': N, 'failures': [], ...}.

import importlib
import importlib.metadata
import io
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # no CUDA-probing chatter on stderr
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# distribution: (pinned version, import names). The supported list, as in profiles/full.txt.
PINS = {
    # Data
    "numpy": ("2.1.3", ["numpy"]),
    "pandas": ("2.2.3", ["pandas"]),
    "scipy": ("1.15.2", ["scipy", "scipy.optimize", "scipy.sparse"]),
    "pyarrow": ("18.1.0", ["pyarrow", "pyarrow.parquet"]),
    "numexpr": ("2.14.1", ["numexpr"]),
    "narwhals": ("2.19.0", ["narwhals"]),
    # ML
    "scikit-learn": ("1.6.1", ["sklearn", "sklearn.linear_model"]),
    "tensorflow": ("2.20.0", ["tensorflow"]),
    "keras": ("3.14.0", ["keras"]),
    "xgboost": ("3.2.0", ["xgboost"]),
    "thinc": ("8.3.13", ["thinc", "thinc.api"]),
    # NLP
    "nltk": ("3.9.1", ["nltk"]),
    "spacy": ("3.8.14", ["spacy"]),
    "spacy-legacy": ("3.0.12", ["spacy_legacy"]),
    "spacy-loggers": ("1.0.5", ["spacy_loggers"]),
    "textblob": ("0.19.0", ["textblob"]),
    "catalogue": ("2.0.10", ["catalogue"]),
    "confection": ("1.3.3", ["confection"]),
    "cymem": ("2.0.13", ["cymem", "cymem.cymem"]),
    "murmurhash": ("1.0.15", ["murmurhash", "murmurhash.mrmr"]),
    "preshed": ("3.0.13", ["preshed", "preshed.maps"]),
    "srsly": ("2.5.3", ["srsly"]),
    "wasabi": ("1.1.3", ["wasabi"]),
    "weasel": ("1.0.0", ["weasel"]),
    # Scientific
    "mpmath": ("1.3.0", ["mpmath"]),
    "sympy": ("1.13.3", ["sympy"]),
    "networkx": ("3.6.1", ["networkx"]),
    # Performance
    "numba": ("0.64.0", ["numba"]),
    "llvmlite": ("0.46.0", ["llvmlite", "llvmlite.binding"]),
    "blis": ("1.3.3", ["blis", "blis.py"]),
    "opt_einsum": ("3.4.0", ["opt_einsum"]),
    "optree": ("0.19.0", ["optree"]),
    "nvidia-nccl-cu12": ("2.29.7", ["nvidia.nccl"]),
    # Statistics, operations research
    "statsmodels": ("0.14.6", ["statsmodels", "statsmodels.api"]),
    "patsy": ("1.0.2", ["patsy"]),
    "ortools": (
        "9.14.6206",
        ["ortools", "ortools.linear_solver.pywraplp", "ortools.sat.python.cp_model"],
    ),
    # Visualization
    "matplotlib": ("3.10.1", ["matplotlib", "matplotlib.pyplot"]),
    "matplotlib-inline": ("0.2.1", ["matplotlib_inline"]),
    "matplotlib-venn": ("1.1.2", ["matplotlib_venn"]),
    "seaborn": ("0.13.2", ["seaborn"]),
    "plotly": ("6.1.2", ["plotly", "plotly.graph_objects"]),
    "bokeh": ("3.8.2", ["bokeh", "bokeh.plotting"]),
    "mizani": ("0.13.5", ["mizani"]),
    "contourpy": ("1.3.1", ["contourpy"]),
    "cycler": ("0.12.1", ["cycler"]),
    "fonttools": ("4.62.1", ["fontTools", "fontTools.ttLib"]),
    "kiwisolver": ("1.5.0", ["kiwisolver"]),
    # Images
    "opencv-python": ("4.11.0.86", ["cv2"]),
    "pillow": ("11.1.0", ["PIL", "PIL.Image"]),
    "imageio": ("2.37.0", ["imageio", "imageio.v3"]),
    "scikit-image": ("0.25.2", ["skimage", "skimage.filters"]),
    "tifffile": ("2026.4.11", ["tifffile"]),
    # Files
    "openpyxl": ("3.1.5", ["openpyxl"]),
    "xlrd": ("2.0.1", ["xlrd"]),
    "XlsxWriter": ("3.2.0", ["xlsxwriter"]),
    "PyPDF2": ("3.0.1", ["PyPDF2"]),
    "fpdf": ("1.7.2", ["fpdf"]),
    "reportlab": ("4.3.1", ["reportlab", "reportlab.pdfgen.canvas"]),
    "PyLaTeX": ("1.4.2", ["pylatex"]),
    "python-docx": ("1.1.2", ["docx"]),
    "python-pptx": ("1.0.2", ["pptx"]),
    "lxml": ("5.3.1", ["lxml", "lxml.etree"]),
    "et_xmlfile": ("2.0.0", ["et_xmlfile"]),
    "Markdown": ("3.10.2", ["markdown"]),
    "markdown-it-py": ("4.0.0", ["markdown_it"]),
    "mdurl": ("0.1.2", ["mdurl"]),
    "PyYAML": ("6.0.3", ["yaml"]),
    "striprtf": ("0.0.28", ["striprtf", "striprtf.striprtf"]),
    "h5py": ("3.16.0", ["h5py"]),
    "smart_open": ("7.6.0", ["smart_open"]),
    "cloudpathlib": ("0.23.0", ["cloudpathlib"]),
    # Web (no network in a sandbox: imports and offline objects only)
    "requests": ("2.33.1", ["requests"]),
    "httpx": ("0.28.1", ["httpx"]),
    "httpcore": ("1.0.9", ["httpcore"]),
    "urllib3": ("2.6.3", ["urllib3"]),
    "grpcio": ("1.80.0", ["grpc"]),
    "h11": ("0.16.0", ["h11"]),
    "idna": ("3.11", ["idna"]),
    "certifi": ("2026.2.25", ["certifi"]),
    "tornado": ("6.5.5", ["tornado", "tornado.web"]),
    "Werkzeug": ("3.1.8", ["werkzeug"]),
    "Jinja2": ("3.1.6", ["jinja2"]),
    "MarkupSafe": ("3.0.3", ["markupsafe"]),
    # Tooling
    "pip": ("24.2", ["pip"]),
    "setuptools": ("82.0.1", ["setuptools"]),
    "wheel": ("0.46.3", ["wheel"]),
    "packaging": ("24.0", ["packaging", "packaging.version"]),
    "click": ("8.3.2", ["click"]),
    "typer": ("0.24.1", ["typer"]),
    "rich": ("15.0.0", ["rich"]),
    "termcolor": ("3.3.0", ["termcolor"]),
    "tqdm": ("4.67.3", ["tqdm"]),
    "shellingham": ("1.5.4", ["shellingham"]),
    "pydantic": ("2.13.1", ["pydantic"]),
    "pydantic_core": ("2.46.1", ["pydantic_core"]),
    "annotated-types": ("0.7.0", ["annotated_types"]),
    "jsonschema": ("4.23.0", ["jsonschema"]),
    "jsonschema-specifications": ("2024.10.1", ["jsonschema_specifications"]),
    "referencing": ("0.37.0", ["referencing"]),
    "protobuf": ("6.31.1", ["google.protobuf"]),
    "flatbuffers": ("25.12.19", ["flatbuffers"]),
    "anyio": ("4.13.0", ["anyio"]),
    "joblib": ("1.4.2", ["joblib"]),
    "threadpoolctl": ("3.6.0", ["threadpoolctl"]),
    "pyparsing": ("3.2.1", ["pyparsing"]),
    "astunparse": ("1.6.3", ["astunparse"]),
    "libclang": ("18.1.1", ["clang", "clang.cindex"]),
    "python-dateutil": ("2.9.0.post0", ["dateutil", "dateutil.parser"]),
    "pytz": ("2025.2", ["pytz"]),
    "tzdata": ("2025.3", ["tzdata"]),
    "attrs": ("25.3.0", ["attr", "attrs"]),
    "toolz": ("1.0.0", ["toolz"]),
    "six": ("1.17.0", ["six"]),
    "wrapt": ("2.1.2", ["wrapt"]),
    "immutabledict": ("4.3.1", ["immutabledict"]),
    "ordered-set": ("4.1.0", ["ordered_set"]),
    "lazy-loader": ("0.5", ["lazy_loader"]),
    "google-pasta": ("0.2.0", ["pasta"]),
    "traitlets": ("5.14.3", ["traitlets"]),
    "regex": ("2026.4.4", ["regex"]),
    "chardet": ("7.4.3", ["chardet"]),
    "charset-normalizer": ("3.4.7", ["charset_normalizer"]),
    "typing_extensions": ("4.15.0", ["typing_extensions"]),
    "typing-inspection": ("0.4.2", ["typing_inspection"]),
    "Pygments": ("2.20.0", ["pygments"]),
    "ml_dtypes": ("0.5.4", ["ml_dtypes"]),
    "rpds-py": ("0.30.0", ["rpds"]),
    "annotated-doc": ("0.0.4", ["annotated_doc"]),
    "namex": ("0.1.0", ["namex"]),
    "tensorboard": ("2.20.0", ["tensorboard"]),
    "tensorboard-data-server": ("0.7.2", ["tensorboard_data_server"]),
    # Geospatial
    "geopandas": ("1.0.1", ["geopandas"]),
    "pyogrio": ("0.12.1", ["pyogrio"]),
    "pyproj": ("3.7.2", ["pyproj"]),
    "shapely": ("2.1.2", ["shapely", "shapely.geometry"]),
    "xyzservices": ("2026.3.0", ["xyzservices"]),
    # Misc
    "chess": ("1.11.2", ["chess"]),
    "gast": ("0.7.0", ["gast"]),
}
# Pinned in profiles/full.txt though not on the supported list (DEVIATIONS.md): checked too.
ADDED = {"absl-py": "2.5.1", "cloudpickle": "3.1.2"}
# Pins that sandbox-image/DEVIATIONS.md documents as not met: distribution -> what is used
# instead. Their version is not checked (their imports still are, if they are installed).
DEVIATIONS = {}
# Installed at their pin but not importable as the list has them (DEVIATIONS.md):
# distribution -> the missing module its import fails on. Any other failure is a failure.
IMPORT_NEEDS = {"matplotlib-inline": "IPython"}

_started = time.monotonic()
failures = []
timings = {}


def _fail(what, exc):
    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    failures.append(f"{what}: {detail}"[:600])


# --- 1. Versions -------------------------------------------------------------------------
versions_ok = 0
_expected = {_dist: _pin for _dist, (_pin, _modules) in PINS.items()}
_expected.update(ADDED)
for _dist, _pin in _expected.items():
    if _dist in DEVIATIONS:
        continue
    try:
        _have = importlib.metadata.version(_dist)
    except importlib.metadata.PackageNotFoundError:
        failures.append(f"version {_dist}: not installed (pinned {_pin})")
        continue
    if _have != _pin:
        failures.append(f"version {_dist}: {_have} installed, {_pin} pinned")
    else:
        versions_ok += 1

# Installed distributions that are not on the list (before the imports below: setuptools,
# once imported, puts its vendored distributions on sys.path).
_listed = {_name.lower().replace("_", "-") for _name in PINS}  # ADDED ones are reported too
extra = sorted(
    _d.metadata["Name"]
    for _d in importlib.metadata.distributions()
    if _d.metadata["Name"].lower().replace("_", "-") not in _listed
)

# --- 2. Imports --------------------------------------------------------------------------
imports_ok = 0
known_limits = []
_t = time.monotonic()
for _dist, (_pin, _modules) in PINS.items():
    for _module in _modules:
        _t0 = time.monotonic()
        try:
            importlib.import_module(_module)
            imports_ok += 1
        except ModuleNotFoundError as exc:
            if exc.name is not None and exc.name == IMPORT_NEEDS.get(_dist):
                known_limits.append(f"{_module} ({_dist}) needs {exc.name}, not on the list")
            else:
                _fail(f"import {_module} ({_dist})", exc)
        except BaseException as exc:  # a failed import may raise anything
            _fail(f"import {_module} ({_dist})", exc)
        if time.monotonic() - _t0 > 2:
            timings[f"import {_module}"] = round(time.monotonic() - _t0, 1)
timings["imports"] = round(time.monotonic() - _t, 1)

# --- 3. One small real operation per area ------------------------------------------------
_workdir = tempfile.mkdtemp(prefix="verify-full-", dir=os.getcwd())
operations = {}


def _op(area):
    def run(fn):
        t0 = time.monotonic()
        try:
            result = fn()
            operations[area] = "ok" if result is None else str(result)[:80]
        except BaseException as exc:  # including SystemExit from a library
            operations[area] = "FAILED"
            _fail(f"operation {area}", exc)
        timings[area] = round(time.monotonic() - t0, 2)
        return fn

    return run


def _path(name):
    return os.path.join(_workdir, name)


@_op("data: pandas/pyarrow/numexpr/narwhals")
def _data():
    import narwhals as nw
    import numexpr
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import scipy.optimize

    df = pd.DataFrame({"k": ["a", "b", "a", "b"], "v": np.arange(4.0)})
    sums = df.groupby("k")["v"].sum().to_dict()
    assert sums == {"a": 2.0, "b": 4.0}, sums
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df), buf)
    back = pq.read_table(io.BytesIO(buf.getvalue())).to_pandas()
    assert back.equals(df), back
    a = np.arange(5.0)
    assert numexpr.evaluate("2 * a + 1", local_dict={"a": a}).tolist() == [1.0, 3.0, 5.0, 7.0, 9.0]
    assert nw.from_native(df).select(nw.col("v").max()).item() == 3.0
    root = scipy.optimize.brentq(lambda x: x * x - 2, 0, 2)
    assert abs(root - 2**0.5) < 1e-9, root
    return f"sums={sums}"


@_op("ml: scikit-learn/xgboost")
def _ml():
    import numpy as np
    import xgboost
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    score = LogisticRegression(max_iter=500).fit(x, y).score(x, y)
    assert score > 0.9, score
    booster = xgboost.XGBClassifier(n_estimators=5, max_depth=2, n_jobs=1)
    booster.fit(x, (y == 0).astype(np.int32))
    assert (booster.predict(x[:5]) == 1).all()
    return f"sklearn score={score:.2f}"


@_op("ml: keras training step (tensorflow, CPU)")
def _keras():
    import keras
    import numpy as np
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    x = np.random.rand(32, 4).astype("float32")
    y = (x.sum(axis=1) > 2).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(optimizer="adam", loss="binary_crossentropy")
    history = model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    loss = history.history["loss"][0]
    assert np.isfinite(loss), loss
    assert keras.backend.backend() == "tensorflow"
    gpus = len(tf.config.list_physical_devices("GPU"))
    return f"tf {tf.__version__}, loss={loss:.3f}, gpus={gpus}"


@_op("nlp: spacy/thinc/nltk/textblob")
def _nlp():
    import nltk
    import spacy
    import thinc.api
    from textblob import TextBlob

    nlp = spacy.blank("en")
    doc = nlp("Petri runs untrusted Python in sandboxes.")
    assert [t.text for t in doc][-1] == ".", [t.text for t in doc]
    ops = thinc.api.get_current_ops()
    assert ops.asarray([1.0, 2.0]).sum() == 3.0
    assert nltk.stem.PorterStemmer().stem("running") == "run"
    assert nltk.tokenize.wordpunct_tokenize("Hello, world") == ["Hello", ",", "world"]
    polarity = TextBlob("This is a wonderful, great library.").sentiment.polarity
    assert polarity > 0, polarity
    return f"{len(doc)} tokens, polarity={polarity:.2f}"


@_op("scientific: sympy/mpmath/networkx")
def _sci():
    import mpmath
    import networkx as nx
    import sympy

    x = sympy.symbols("x")
    roots = sympy.solve(x**2 - 4, x)
    assert sorted(roots) == [-2, 2], roots
    mpmath.mp.dps = 30
    assert str(mpmath.sqrt(2))[:10] == "1.41421356"
    graph = nx.path_graph(5)
    assert nx.shortest_path_length(graph, 0, 4) == 4
    return f"roots={roots}"


@_op("performance: numba/blis/opt_einsum/optree")
def _perf():
    import blis.py
    import numba
    import numpy as np
    import opt_einsum
    import optree

    @numba.njit(cache=False)
    def total(values):
        acc = 0.0
        for v in values:
            acc += v
        return acc

    assert total(np.arange(10.0)) == 45.0
    a = np.ones((3, 4), dtype="float32")
    b = np.ones((4, 2), dtype="float32")
    assert blis.py.gemm(a, b).sum() == 24.0
    assert opt_einsum.contract("ij,jk->ik", a, b).sum() == 24.0
    leaves, _ = optree.tree_flatten({"a": 1, "b": (2, 3)})
    assert leaves == [1, 2, 3], leaves
    nccl = importlib.import_module("nvidia.nccl")
    libs = [p for d in nccl.__path__ for p in os.listdir(os.path.join(d, "lib"))]
    assert any(name.startswith("libnccl") for name in libs), libs


@_op("statistics: statsmodels/patsy")
def _stats():
    import numpy as np
    import pandas as pd
    import statsmodels.formula.api as smf

    df = pd.DataFrame({"x": np.arange(10.0)})
    df["y"] = 3 * df["x"] + 1
    fit = smf.ols("y ~ x", data=df).fit()
    assert abs(fit.params["x"] - 3) < 1e-9, fit.params
    return f"slope={fit.params['x']:.3f}"


@_op("operations research: ortools")
def _ortools():
    from ortools.linear_solver import pywraplp
    from ortools.sat.python import cp_model

    solver = pywraplp.Solver.CreateSolver("GLOP")
    x = solver.NumVar(0, 10, "x")
    y = solver.NumVar(0, 10, "y")
    solver.Add(x + y <= 4)
    solver.Maximize(3 * x + y)
    assert solver.Solve() == pywraplp.Solver.OPTIMAL
    assert abs(solver.Objective().Value() - 12) < 1e-9
    model = cp_model.CpModel()
    a = model.NewIntVar(0, 10, "a")
    model.Add(2 * a == 8)
    cp = cp_model.CpSolver()
    cp.parameters.num_workers = 1
    assert cp.Solve(model) == cp_model.OPTIMAL and cp.Value(a) == 4
    return "lp=12, cp a=4"


@_op("visualization: matplotlib PNG/seaborn/venn/plotly/bokeh")
def _viz():
    import bokeh.embed
    import bokeh.plotting
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mizani.formatters
    import pandas as pd
    import plotly.graph_objects as go
    import seaborn as sns
    from matplotlib_venn import venn2

    fig, ax = plt.subplots(figsize=(2, 2))
    sns.lineplot(data=pd.DataFrame({"x": [0, 1, 2], "y": [0, 1, 4]}), x="x", y="y", ax=ax)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    assert png.getvalue().startswith(b"\x89PNG\r\n\x1a\n"), png.getvalue()[:8]
    fig2, _ = plt.subplots()
    venn2(subsets=(3, 2, 1))
    plt.close(fig2)
    assert "bar" in go.Figure(go.Bar(y=[1, 2])).to_json()
    plot = bokeh.plotting.figure(width=100, height=100)
    plot.line([1, 2], [3, 4])
    assert "<html" in bokeh.embed.file_html(plot, title="t").lower()
    assert mizani.formatters.percent_format()([0.5]) == ["50%"]
    return f"png {len(png.getvalue())} bytes"


@_op("images: opencv/pillow/imageio/scikit-image/tifffile")
def _images():
    import cv2
    import imageio.v3 as iio
    import numpy as np
    import skimage.filters
    import tifffile
    from PIL import Image

    img = (np.random.rand(40, 60, 3) * 255).astype(np.uint8)
    small = cv2.resize(img, (30, 20))
    assert small.shape == (20, 30, 3), small.shape
    Image.fromarray(small).save(_path("a.png"))
    assert Image.open(_path("a.png")).size == (30, 20)
    assert iio.imread(_path("a.png")).shape == (20, 30, 3)
    tifffile.imwrite(_path("a.tif"), small)
    assert (tifffile.imread(_path("a.tif")) == small).all()
    assert skimage.filters.gaussian(small[..., 0], sigma=1).shape == (20, 30)
    return f"resized to {small.shape}"


@_op("files: docx/pptx/xlsx/pdf/latex/markdown/yaml/rtf/hdf5")
def _files():
    import docx
    import h5py
    import markdown
    import markdown_it
    import numpy as np
    import openpyxl
    import pptx
    import pylatex
    import PyPDF2
    import xlsxwriter
    import yaml
    from fpdf import FPDF
    from reportlab.pdfgen import canvas
    from striprtf.striprtf import rtf_to_text

    document = docx.Document()
    document.add_paragraph("hello docx")
    document.save(_path("a.docx"))
    assert docx.Document(_path("a.docx")).paragraphs[0].text == "hello docx"

    deck = pptx.Presentation()
    slide = deck.slides.add_slide(deck.slide_layouts[5])
    slide.shapes.title.text = "hello pptx"
    deck.save(_path("a.pptx"))
    assert pptx.Presentation(_path("a.pptx")).slides[0].shapes.title.text == "hello pptx"

    book = openpyxl.Workbook()
    book.active["A1"] = 42
    book.save(_path("a.xlsx"))
    assert openpyxl.load_workbook(_path("a.xlsx")).active["A1"].value == 42
    workbook = xlsxwriter.Workbook(_path("b.xlsx"))
    workbook.add_worksheet().write("B2", "hello xlsx")
    workbook.close()
    assert openpyxl.load_workbook(_path("b.xlsx")).active["B2"].value == "hello xlsx"

    pdf = canvas.Canvas(_path("a.pdf"))
    pdf.drawString(100, 750, "hello reportlab")
    pdf.save()
    assert "hello reportlab" in PyPDF2.PdfReader(_path("a.pdf")).pages[0].extract_text()
    fpdf = FPDF()
    fpdf.add_page()
    fpdf.set_font("Arial", size=12)
    fpdf.cell(40, 10, "hello fpdf")
    fpdf.output(_path("b.pdf"))
    assert "hello fpdf" in PyPDF2.PdfReader(_path("b.pdf")).pages[0].extract_text()

    tex = pylatex.Document()
    tex.append("hello latex")
    assert "hello latex" in tex.dumps()
    assert markdown.markdown("# hi") == "<h1>hi</h1>"
    assert markdown_it.MarkdownIt().render("*hi*").strip() == "<p><em>hi</em></p>"
    assert yaml.safe_load(yaml.safe_dump({"a": [1, 2]})) == {"a": [1, 2]}
    assert rtf_to_text(r"{\rtf1\ansi hello rtf}").strip() == "hello rtf"
    with h5py.File(_path("a.h5"), "w") as h5:
        h5["x"] = np.arange(3)
    with h5py.File(_path("a.h5"), "r") as h5:
        assert h5["x"][:].tolist() == [0, 1, 2]
    return "docx, pptx, xlsx x2, pdf x2, h5 written and read back"


@_op("web and tooling: offline objects")
def _web():
    import httpx
    import jinja2
    import jsonschema
    import pydantic
    import requests
    import rich.console
    import werkzeug.datastructures

    prepared = requests.Request("GET", "http://example.invalid/", params={"q": "1"}).prepare()
    assert prepared.url == "http://example.invalid/?q=1", prepared.url
    assert httpx.Request("GET", "http://example.invalid/").method == "GET"
    assert jinja2.Template("{{ a }}!").render(a="hi") == "hi!"
    assert werkzeug.datastructures.MultiDict([("a", "1"), ("a", "2")]).getlist("a") == ["1", "2"]

    class Point(pydantic.BaseModel):
        x: int

    assert Point.model_validate({"x": "3"}).x == 3
    jsonschema.validate({"x": 1}, {"type": "object", "properties": {"x": {"type": "integer"}}})
    console = rich.console.Console(file=io.StringIO(), width=40)
    console.print("[bold]hi[/bold]")
    assert console.file.getvalue().strip() == "hi"


@_op("geospatial: shapely/geopandas/pyproj/pyogrio")
def _geo():
    import geopandas as gpd
    import pyogrio
    import pyproj
    from shapely.geometry import Point

    assert abs(Point(0, 0).buffer(1).area - 3.1365) < 0.01
    frame = gpd.GeoDataFrame({"name": ["a", "b"]}, geometry=[Point(0, 0), Point(1, 1)], crs=4326)
    metres = frame.to_crs(3857)
    assert abs(metres.geometry.iloc[1].x - 111319.49) < 1, metres.geometry.iloc[1]
    frame.to_file(_path("a.gpkg"), driver="GPKG", engine="pyogrio")
    back = pyogrio.read_dataframe(_path("a.gpkg"))
    assert back["name"].tolist() == ["a", "b"], back
    assert pyproj.CRS.from_epsg(4326).name == "WGS 84"
    return f"proj {pyproj.proj_version_str}"


@_op("misc: chess/gast")
def _misc():
    import ast

    import chess
    import gast

    assert len(list(chess.Board().legal_moves)) == 20
    assert isinstance(gast.parse("x = 1"), gast.Module)
    assert ast.dump(gast.gast_to_ast(gast.parse("x = 1")))


shutil.rmtree(_workdir, ignore_errors=True)

# --- Report --------------------------------------------------------------------------------
print(f"python {platform.python_version()} on {platform.platform()}")
print(f"versions: {versions_ok}/{len(_expected) - len(DEVIATIONS)} distributions at their pin")
print(f"imports: {imports_ok}/{sum(len(m) for _, m in PINS.values())} modules")
for _area, _outcome in operations.items():
    _mark = "FAIL" if _outcome == "FAILED" else "ok  "
    print(f"  {_mark} {_area} ({timings[_area]} s): {_outcome}")
if DEVIATIONS:
    print("documented deviations (not version-checked):", ", ".join(sorted(DEVIATIONS)))
for _limit in known_limits:
    print("known limitation (DEVIATIONS.md):", _limit)
print("installed but not on the list:", ", ".join(extra) or "none")
print("slow imports:", {k: v for k, v in timings.items() if k.startswith("import ")})
print(f"total {time.monotonic() - _started:.1f} s")
if failures:
    print(f"{len(failures)} FAILURE(S):")
    for _failure in failures:
        print("  -", _failure)
    sys.stdout.flush()
    raise AssertionError(f"{len(failures)} failure(s):\n" + "\n".join(failures))
print("all checks passed")

{
    "checked": len(PINS),
    "versions_ok": versions_ok,
    "imports_ok": imports_ok,
    "operations": len(operations),
    "deviations": sorted(DEVIATIONS),
    "known_limits": known_limits,
    "not_on_list": extra,
    "python": platform.python_version(),
    "seconds": round(time.monotonic() - _started, 1),
    "failures": failures,
}

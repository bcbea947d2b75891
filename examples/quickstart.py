# petri's quickstart: create a sandbox, run code, get a figure and a file back; leaving the
# `with` block deletes the sandbox. Run: pip install ./client, then
# PETRI_ADDR=host:port python examples/quickstart.py (and PETRI_TOKEN if the service wants one).
import petri

CODE = """
import matplotlib.pyplot as plt
plt.plot([1, 4, 9])
open("out.txt", "w").write("hello")
6 * 7
"""

with petri.Sandbox.create(ttl=600) as sb:
    ex = sb.run(CODE)  # ex.error would hold an exception of the code, with its traceback
    png = next(r.png for r in ex.results if r.png)  # the figure left open, as a PNG
    print("value:", ex.text, "| figure:", len(png), "PNG bytes")
    print("file:", ex.files[0].path, ex.files[0].content.decode())

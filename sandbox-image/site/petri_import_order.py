"""OR-Tools' native extensions are loaded before TensorFlow's (petri sandbox images).

TensorFlow loads its native library with RTLD_GLOBAL, which exports its own builds of abseil
and protobuf to everything loaded later. OR-Tools extension modules loaded after it bind to
those instead of their own and crash the interpreter (SIGSEGV in Solve, for GLOP, CP-SAT,
routing...). Loaded before TensorFlow, they work, and so does TensorFlow. So, on the first
import of `tensorflow`, this finder imports OR-Tools' extensions first (about 0.2 s), when
OR-Tools is installed; otherwise it does nothing. Installed by sandbox-image/build.sh with a
.pth file; see sandbox-image/DEVIATIONS.md.

Not math_opt's core solver module: its pybind11 type StatusCode collides with TensorFlow's
(TensorFlow's import then fails), and after TensorFlow it crashes. math_opt and TensorFlow
cannot share an interpreter, in either order.
"""

import importlib
import importlib.util
import sys

# The extension modules of ortools 9.14, minus ortools.math_opt.core.python.solver.
_PRELOAD = (
    "ortools.init.python.init",
    "ortools.util.python.sorted_interval_list",
    "ortools.linear_solver._pywraplp",
    "ortools.linear_solver.python.model_builder_helper",
    "ortools.sat.python.cp_model_helper",
    "ortools.constraint_solver._pywrapcp",
    "ortools.algorithms.python.knapsack_solver",
    "ortools.graph.python.linear_sum_assignment",
    "ortools.graph.python.max_flow",
    "ortools.graph.python.min_cost_flow",
    "ortools.pdlp.python.pdlp",
    "ortools.scheduling.python.rcpsp",
    "ortools.set_cover.python.set_cover",
    "ortools.math_opt.elemental.python.cpp_elemental",
    "ortools.math_opt.io.python.mps_converter",
)


class OrToolsBeforeTensorFlow:
    """A meta path finder that finds nothing: it only acts on the first `tensorflow` lookup."""

    done = False

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "tensorflow" or cls.done:
            return None
        cls.done = True  # (not removed from sys.meta_path: that list is being iterated)
        if "tensorflow" in sys.modules:
            return None
        try:
            if importlib.util.find_spec("ortools") is None:
                return None
        except Exception:
            return None
        for module in _PRELOAD:
            try:
                importlib.import_module(module)
            except Exception:
                pass  # a missing or broken module shows itself when it is used
        return None


if not any(getattr(f, "__name__", "") == "OrToolsBeforeTensorFlow" for f in sys.meta_path):
    sys.meta_path.insert(0, OrToolsBeforeTensorFlow)

"""The installed package: one version everywhere, and the BLAS library it carries inside itself.

The BLAS (scipy-openblas32's OpenBLAS) is copied into fusedrnn/lib at build time and opened there by the
extension, by its path; nothing of it is needed at run time. Its functions are prefixed (scipy_cblas_*), so
numpy's and torch's BLAS in the same process never stand in for it, nor it for theirs: the child
interpreters below import numpy, torch and fusedrnn in different orders and check all three."""

import ast
import ctypes
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fusedrnn
from fusedrnn import _blas_loader

PACKAGE_DIR = os.path.dirname(os.path.abspath(fusedrnn.__file__))


def test_one_version_in_metadata_module_extension_and_info():
    version = importlib.metadata.version("fusedrnn")
    assert fusedrnn.__version__ == version
    assert fusedrnn.build_info()["version"] == version
    assert fusedrnn._core.__version__ == version  # compiled in: a stale extension would differ
    out = subprocess.run([sys.executable, "-m", "fusedrnn", "info"], capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines()[0] == f"fusedrnn {version}"


def test_blas_is_loaded_from_the_package_itself():
    info = fusedrnn.build_info()
    loaded = info["blas_library"]
    assert os.path.isfile(loaded)
    assert os.path.dirname(os.path.realpath(loaded)) == os.path.realpath(os.path.join(PACKAGE_DIR, "lib"))
    assert [os.path.realpath(p) for p in _blas_loader.library_files()] == [os.path.realpath(loaded)]
    assert info["blas_name"].startswith("scipy-openblas32 ")
    assert info["blas"].startswith("OpenBLAS ")
    # Shipping OpenBLAS means shipping its license.
    assert os.path.isfile(os.path.join(PACKAGE_DIR, "lib", "LICENSE-scipy-openblas32.txt"))


def test_another_copy_of_the_blas_loaded_first_and_made_global_neither_serves_nor_is_served(tmp_path):
    # A library of the same file name (SONAME) loaded before fusedrnn, its symbols global, and fusedrnn
    # imported with RTLD_GLOBAL as some plugin hosts do: fusedrnn's GEMMs still run on its own copy, and
    # pinning that copy to one thread leaves the other's threads alone.
    bundled = fusedrnn.build_info()["blas_library"]
    other = tmp_path / "elsewhere" / os.path.basename(bundled)
    other.parent.mkdir()
    shutil.copyfile(bundled, other)
    script = f"""
import ctypes, os, sys
other = ctypes.CDLL({str(other)!r}, mode=ctypes.RTLD_GLOBAL)
other.scipy_openblas_set_num_threads(3)
sys.setdlopenflags(sys.getdlopenflags() | os.RTLD_GLOBAL)
import numpy as np
import fusedrnn
m = fusedrnn.LSTM(8, 16, seed=0)
y, _ = m(np.ones((4, 2, 8), np.float32))
m.backward(np.ones_like(y))
print(fusedrnn.build_info()["blas_library"], other.scipy_openblas_get_num_threads())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    used, other_threads = out.stdout.split()
    assert os.path.realpath(os.path.dirname(used)) == os.path.realpath(os.path.join(PACKAGE_DIR, "lib"))
    assert other_threads == "3"


def test_a_package_missing_its_blas_says_so_and_still_imports(tmp_path):
    # A broken install: import and `fusedrnn info` work and name the problem; a layer call refuses.
    copy = tmp_path / "fusedrnn"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__", "libscipy_openblas*"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    info = subprocess.run([sys.executable, "-m", "fusedrnn", "info"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert info.returncode == 0, info.stderr[-3000:]
    assert "BLAS: scipy-openblas32" in info.stdout and "(cannot load: fusedrnn: cannot load its BLAS library" in info.stdout
    call = subprocess.run([sys.executable, "-c", "import numpy as np, fusedrnn; fusedrnn.GRU(2, 3)(np.ones((2, 1, 2), np.float32))"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert call.returncode == 1 and "RuntimeError: fusedrnn: cannot load its BLAS library" in call.stderr, call.stderr


def test_blas_is_no_runtime_dependency():
    requires = importlib.metadata.requires("fusedrnn") or []
    runtime = [r for r in requires if "extra ==" not in r]
    assert not [r for r in runtime if r.lower().replace("_", "-").startswith("scipy-openblas")], runtime


def test_shipped_blas_exports_only_prefixed_names():
    lib = ctypes.CDLL(fusedrnn.build_info()["blas_library"], mode=ctypes.RTLD_LOCAL)
    for name in ("scipy_cblas_sgemm", "scipy_cblas_dgemm", "scipy_openblas_set_num_threads"):
        assert hasattr(lib, name), name
    # The names another BLAS in the process exports (numpy's, torch's, a system one).
    for name in ("cblas_sgemm", "cblas_dgemm", "sgemm_", "dgemm_", "openblas_set_num_threads"):
        assert not hasattr(lib, name), name


# A child interpreter imports the three packages in the given order, then: matmuls of numpy and torch
# against a product computed without any BLAS, fusedrnn's LSTM (float32) against the float64 reference
# and against torch.nn.LSTM with the same weights, and which file fusedrnn's BLAS came from.
CHILD = r"""
import importlib, json, sys
for name in sys.argv[1].split(","):
    importlib.import_module(name)
import numpy as np, torch, fusedrnn
from fusedrnn import reference

rng = np.random.default_rng(0)
a, b = rng.standard_normal((37, 53)), rng.standard_normal((53, 29))
exact = (a[:, :, None] * b[None, :, :]).sum(axis=1)  # elementwise: no BLAS involved
out = {
    "numpy_matmul": float(np.abs(a @ b - exact).max()),
    "numpy_matmul_f32": float(np.abs(a.astype(np.float32) @ b.astype(np.float32) - exact).max()),
    "torch_matmul": float((torch.from_numpy(a) @ torch.from_numpy(b) - torch.from_numpy(exact)).abs().max()),
}
T, B, I, H = 7, 3, 5, 16
lstm = fusedrnn.LSTM(I, H, seed=0)
x = rng.standard_normal((T, B, I)).astype(np.float32)
y, (h_n, c_n) = lstm(x)
p = {k: v.astype(np.float64) for k, v in lstm.state_dict().items()}
want, _, _, _ = reference.forward("lstm", x.astype(np.float64), p["weight_ih_l0"], p["weight_hh_l0"],
                                  p["bias_ih_l0"], p["bias_hh_l0"])
out["fusedrnn_vs_reference"] = float(np.abs(y - want).max())
peer = torch.nn.LSTM(I, H)
peer.load_state_dict({k: torch.from_numpy(v) for k, v in lstm.state_dict().items()})
with torch.no_grad():
    y_torch, _ = peer(torch.from_numpy(x))
out["fusedrnn_vs_torch"] = float(np.abs(y - y_torch.numpy()).max())
out["fusedrnn_blas"] = fusedrnn.build_info()["blas_library"]
print(json.dumps(out))
"""


@pytest.mark.parametrize("order", ["numpy,torch,fusedrnn", "fusedrnn,torch,numpy", "torch,fusedrnn,numpy"])
def test_numpy_torch_and_fusedrnn_blas_coexist(order):
    pytest.importorskip("torch")
    run = subprocess.run([sys.executable, "-c", CHILD, order], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["numpy_matmul"] < 1e-12
    assert got["numpy_matmul_f32"] < 1e-4
    assert got["torch_matmul"] < 1e-12
    assert got["fusedrnn_vs_reference"] < 1e-5
    assert got["fusedrnn_vs_torch"] < 1e-5
    assert os.path.realpath(got["fusedrnn_blas"]) == os.path.realpath(fusedrnn.build_info()["blas_library"])


def test_torch_extra_takes_the_adapters_floor():
    # The floor fusedrnn.torch checks at import, read from its source (importing it needs torch).
    with open(os.path.join(PACKAGE_DIR, "torch", "__init__.py")) as f:
        floor = next(ast.literal_eval(line.split("=", 1)[1].strip()) for line in f
                     if line.startswith("TORCH_FLOOR ="))
    requires = [r.replace(" ", "") for r in importlib.metadata.requires("fusedrnn") or []]
    torch_extra = [r.split(";")[0] for r in requires if r.startswith("torch") and 'extra=="torch"' in r]
    assert torch_extra == [f"torch>={floor}"]


def test_torch_without_custom_op_is_refused_by_name():
    pytest.importorskip("torch")
    code = ("import torch; del torch.library.custom_op\n"
            "try:\n    import fusedrnn.torch\nexcept ImportError as e:\n    print(e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "fusedrnn.torch needs torch>=2.4 (torch.library.custom_op); this is torch" in run.stdout

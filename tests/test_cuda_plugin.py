"""Where the CUDA module comes from: built into fusedrnn (a source build with FUSEDRNN_CUDA=ON), else
the fusedrnn-cuda13 plugin of fusedrnn's own version, found at import through one loader
(fusedrnn._cuda_layer.cuda_module). The loader's choices are checked with fake modules: a fake built-in
module placed in sys.modules, a fake plugin as a package in a temporary directory on sys.path; the real
ones, where installed, are hidden for the test. And the plugin's pyproject.toml against the CPU
package's: one version, the pins between the two, the names the loader looks for."""

import importlib
import importlib.machinery
import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
import types

import pytest

import fusedrnn
from fusedrnn import _cuda_layer, cli

VERSION = fusedrnn.__version__
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_PYPROJECT = os.path.join(REPO, "plugins", "cuda13", "pyproject.toml")
PLUGIN_MODULES = ("fusedrnn_cuda13", "fusedrnn_cuda13._version", "fusedrnn_cuda13._cuda")
FAKE_MODULE = """
architectures = "80,90"
compiler_version = "13.0.88"
def runtime_version():
    return 13000
def device_count():
    return 0
def device_name(device):
    raise AssertionError("no device to name")
"""


@pytest.fixture
def no_cuda_module(monkeypatch):
    """Neither the built-in module nor the plugin is found (a None entry in sys.modules hides a module
    from find_spec and import); the loader's cache is emptied. Undone after the test."""
    monkeypatch.setattr(_cuda_layer, "_module", None)
    for name in ("fusedrnn._cuda", *PLUGIN_MODULES):
        monkeypatch.setitem(sys.modules, name, None)
    return monkeypatch


def fake_built_in(monkeypatch):
    module = types.ModuleType("fusedrnn._cuda")
    exec(FAKE_MODULE, module.__dict__)
    module.__spec__ = importlib.machinery.ModuleSpec("fusedrnn._cuda", None)
    monkeypatch.setitem(sys.modules, "fusedrnn._cuda", module)
    return module


def fake_plugin(monkeypatch, tmp_path, version, module_source=FAKE_MODULE):
    """A package fusedrnn_cuda13 in tmp_path, laid out as the plugin's wheel installs it."""
    package = tmp_path / "fusedrnn_cuda13"
    package.mkdir()
    (package / "__init__.py").write_text("from ._version import __version__\n")
    (package / "_version.py").write_text(f'__version__ = "{version}"\n')
    (package / "_cuda.py").write_text(textwrap.dedent(module_source))
    for name in PLUGIN_MODULES:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()


def info_line(capsys) -> str:
    assert cli.main(["info"]) == 0
    return next(line.strip() for line in capsys.readouterr().out.splitlines() if "CUDA:" in line)


def test_the_built_in_module_comes_first(no_cuda_module, tmp_path, capsys):
    built_in = fake_built_in(no_cuda_module)
    fake_plugin(no_cuda_module, tmp_path, VERSION)
    assert _cuda_layer.cuda_module() is built_in
    info = fusedrnn.cuda_info()
    assert info == dict(installed=True, source="built in", loaded=True, module="fusedrnn._cuda",
                        architectures="80,90", nvcc="13.0.88", runtime="13.0", devices=0, device_names=[],
                        jax_ffi=None)
    assert fusedrnn.build_info()["cuda"] == info
    assert "fusedrnn_cuda13._cuda" not in sys.modules
    assert info_line(capsys) == "CUDA: built in, built for sm 80,90 (nvcc 13.0.88, runtime 13.0), 0 device(s)"


def test_the_plugin_of_fusedrnns_version_is_loaded(no_cuda_module, tmp_path, capsys):
    fake_plugin(no_cuda_module, tmp_path, VERSION)
    module = _cuda_layer.cuda_module()
    assert module.__name__ == "fusedrnn_cuda13._cuda"
    assert module.__file__ == str(tmp_path / "fusedrnn_cuda13" / "_cuda.py")
    assert _cuda_layer.cuda_module() is module  # loaded once
    info = fusedrnn.cuda_info()
    assert info["source"] == f"fusedrnn-cuda13 {VERSION}"
    assert info["loaded"] and info["module"] == "fusedrnn_cuda13._cuda" and info["architectures"] == "80,90"
    assert info_line(capsys) == (f"CUDA: fusedrnn-cuda13 {VERSION}, built for sm 80,90 (nvcc 13.0.88, runtime 13.0), "
                                 "0 device(s)")


def test_info_names_each_visible_device(no_cuda_module, tmp_path, capsys):
    names = FAKE_MODULE.replace("return 0", "return 2").replace('raise AssertionError("no device to name")',
                                                                 'return ("NVIDIA H200", "NVIDIA H100")[device]')
    fake_plugin(no_cuda_module, tmp_path, VERSION, module_source=names)
    info = fusedrnn.cuda_info()
    assert info["devices"] == 2 and info["device_names"] == ["NVIDIA H200", "NVIDIA H100"]
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "2 device(s)\n    cuda:0: NVIDIA H200\n    cuda:1: NVIDIA H100\n" in out


def test_a_plugin_of_another_version_is_refused_unloaded(no_cuda_module, tmp_path, capsys):
    fake_plugin(no_cuda_module, tmp_path, "0.0.1", module_source="raise AssertionError('loaded')")
    want = (rf"fusedrnn-cuda13 0\.0\.1 is installed, but fusedrnn is {re.escape(VERSION)}: .*"
            rf"pip install 'fusedrnn-cuda13=={re.escape(VERSION)}'")
    with pytest.raises(ImportError, match=want):
        _cuda_layer.cuda_module()
    assert "fusedrnn_cuda13._cuda" not in sys.modules
    info = fusedrnn.cuda_info()
    assert info["installed"] and not info["loaded"] and info["source"] == "fusedrnn-cuda13 0.0.1"
    assert re.search(want, info["error"])
    assert info_line(capsys).startswith("CUDA: fusedrnn-cuda13 0.0.1, does not load: fusedrnn-cuda13 0.0.1 is")


def test_a_module_that_does_not_load_says_which_and_why(no_cuda_module, tmp_path):
    fake_plugin(no_cuda_module, tmp_path, VERSION,
                module_source="raise ImportError('libcublas.so.13: cannot open shared object file')")
    with pytest.raises(ImportError, match=rf"fusedrnn's CUDA module fusedrnn_cuda13._cuda \(fusedrnn-cuda13 "
                                          rf"{re.escape(VERSION)}\) does not load: libcublas.so.13: cannot open"):
        _cuda_layer.cuda_module()
    info = fusedrnn.cuda_info()
    assert info["installed"] and not info["loaded"] and "libcublas.so.13" in info["error"]


def test_a_broken_plugin_package_is_reported_not_raised(no_cuda_module, tmp_path, capsys):
    fake_plugin(no_cuda_module, tmp_path, VERSION)
    (tmp_path / "fusedrnn_cuda13" / "_version.py").unlink()
    want = (r"fusedrnn-cuda13 is installed, but its package does not import as the plugin \(No module named "
            r"'fusedrnn_cuda13\._version")
    with pytest.raises(ImportError, match=want):
        _cuda_layer.cuda_module()
    info = fusedrnn.cuda_info()
    assert info["installed"] and not info["loaded"] and info["source"] == "fusedrnn-cuda13"
    assert re.search(want, info["error"])
    assert info_line(capsys).startswith("CUDA: fusedrnn-cuda13, does not load: fusedrnn-cuda13 is installed")


def test_a_folder_named_as_the_plugin_is_reported_not_raised(no_cuda_module, tmp_path, capsys):
    """A package fusedrnn_cuda13 on sys.path that is not the plugin (a folder of that name, with or
    without an __init__.py) imports without the plugin's __version__. (The empty __init__.py keeps this
    one ahead of a real plugin installed further along sys.path.)"""
    fake_plugin(no_cuda_module, tmp_path, VERSION)
    (tmp_path / "fusedrnn_cuda13" / "__init__.py").write_text("")
    (tmp_path / "fusedrnn_cuda13" / "_version.py").unlink()
    with pytest.raises(ImportError, match=r"does not import as the plugin \(.*has no attribute '__version__'"):
        _cuda_layer.cuda_module()
    assert not fusedrnn.cuda_info()["loaded"] and "__version__" in fusedrnn.build_info()["cuda"]["error"]
    assert info_line(capsys).startswith("CUDA: fusedrnn-cuda13, does not load")


def test_without_a_cuda_module_the_error_says_how_to_get_one(no_cuda_module, capsys):
    want = rf"fusedrnn {re.escape(VERSION)} has no CUDA module: pip install 'fusedrnn\[cuda\]'"
    with pytest.raises(ImportError, match=want):
        _cuda_layer.cuda_module()
    info = fusedrnn.cuda_info()
    assert not info["installed"] and not info["loaded"] and info["source"] is None
    assert re.search(want, info["error"]) and "FUSEDRNN_CUDA=ON" in info["error"]
    assert info_line(capsys).startswith(f"CUDA: none (fusedrnn {VERSION} has no CUDA module: pip install")


def test_cublas_is_found_in_its_wheel_wherever_that_is(monkeypatch, tmp_path):
    for name in ("nvidia", "nvidia.cu13"):  # forgotten for the test, restored after it
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *[p for p in sys.path if "site-packages" not in p]])
    importlib.invalidate_caches()
    assert _cuda_layer.cublas_wheel_library() is None
    lib = tmp_path / "nvidia" / "cu13" / "lib"  # the wheel's layout: namespace packages nvidia, nvidia.cu13
    lib.mkdir(parents=True)
    (lib / "libcublas.so.13").write_bytes(b"")
    importlib.invalidate_caches()
    assert _cuda_layer.cublas_wheel_library() == str(lib / "libcublas.so.13")


def test_torch_modules_say_why_a_cuda_tensor_cannot_run(no_cuda_module):
    pytest.importorskip("torch")
    from fusedrnn.torch import modules

    on_gpu = types.SimpleNamespace(is_cuda=True, is_cpu=False)  # all the check looks at
    with pytest.raises(NotImplementedError, match=rf"input: a CUDA tensor, and fusedrnn {re.escape(VERSION)} has "
                                                  r"no CUDA module: pip install 'fusedrnn\[cuda\]'"):
        modules._check_placement("input", on_gpu)


def test_import_fusedrnn_loads_no_cuda_module():
    code = ("import sys, fusedrnn, fusedrnn.functional, fusedrnn.modules\n"
            "print(sorted(m for m in sys.modules if m.endswith('._cuda') or m.startswith('fusedrnn_cuda')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert run.stdout.strip() == "[]"


def test_only_the_loader_imports_the_cuda_module():
    package = os.path.dirname(os.path.abspath(fusedrnn.__file__))
    direct = re.compile(r"^\s*(from\s+(\.|fusedrnn)\s+import\s+.*\b_cuda\b|import\s+fusedrnn\._cuda\b|"
                        r"from\s+(\.|fusedrnn\.)_cuda\s+import)", re.MULTILINE)
    offenders = []
    for root, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py") and name != "_cuda_layer.py":
                with open(os.path.join(root, name)) as f:
                    offenders += [f"{name}: {m.group(0).strip()}" for m in direct.finditer(f.read())]
    assert not offenders


# ---- the plugin's pyproject.toml (in the source tree) -----------------------------------------------

def plugin_pyproject():
    if not os.path.isfile(PLUGIN_PYPROJECT):
        pytest.skip("runs from the source tree (plugins/cuda13 is not beside these tests)")
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(PLUGIN_PYPROJECT, "rb") as f:
        plugin = tomllib.load(f)
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        cpu = tomllib.load(f)
    return plugin, cpu


def test_plugin_takes_its_version_from_fusedrnn():
    plugin, _ = plugin_pyproject()
    assert "version" in plugin["project"]["dynamic"] and "version" not in plugin["project"]
    version = plugin["tool"]["scikit-build"]["metadata"]["version"]
    assert version["provider"] == "scikit_build_core.metadata.regex"
    source = os.path.normpath(os.path.join(os.path.dirname(PLUGIN_PYPROJECT), version["input"]))
    assert source == os.path.join(REPO, "python", "fusedrnn", "__init__.py")
    # The regex provider's default pattern, on that file: the version fusedrnn reports.
    with open(source) as f:
        found = re.search(r'(?i)^(__version__|VERSION)(?: ?\: ?str)? *= *([\'"])v?(?P<value>.+?)\2', f.read(),
                          re.MULTILINE)
    if os.path.dirname(os.path.abspath(fusedrnn.__file__)) == os.path.dirname(source):
        assert found["value"] == VERSION  # the tests run against this very source tree
    else:
        assert found is not None


def test_plugin_and_cpu_package_pin_each_other():
    plugin, cpu = plugin_pyproject()
    skb = plugin["tool"]["scikit-build"]
    dependencies = skb["metadata"]["dependencies"]
    assert dependencies["provider"] == "scikit_build_core.metadata.template"
    assert dependencies["result"] == ["fusedrnn=={project[version]}", "nvidia-cublas>=13,<14"]
    # fusedrnn[cuda] names the plugin; the plugin's exact pin on fusedrnn makes pip pick its version.
    assert cpu["project"]["optional-dependencies"]["cuda"] == ["fusedrnn-cuda13"]
    assert plugin["project"]["name"] == _cuda_layer.PLUGIN_DISTRIBUTION
    assert skb["wheel"]["packages"] == [_cuda_layer.PLUGIN_PACKAGE]
    assert skb["cmake"]["source-dir"] == "../.."
    assert skb["cmake"]["define"]["FUSEDRNN_CUDA_PLUGIN"] == _cuda_layer.PLUGIN_PACKAGE
    assert [g["path"] for g in skb["generate"]] == [f"{_cuda_layer.PLUGIN_PACKAGE}/_version.py"]
    # Built for the same Pythons, against the same XLA FFI headers.
    assert plugin["project"]["requires-python"] == cpu["project"]["requires-python"]
    jaxlib = [r for r in cpu["build-system"]["requires"] if r.startswith("jaxlib")]
    assert jaxlib and [r for r in plugin["build-system"]["requires"] if r.startswith("jaxlib")] == jaxlib
    assert "nvidia-cublas>=13,<14" in plugin["build-system"]["requires"]


def test_an_installed_plugin_matches_fusedrnn():
    cuda_extra = [r.replace(" ", "") for r in importlib.metadata.requires("fusedrnn") or [] if 'extra == "cuda"' in r]
    assert cuda_extra == ['fusedrnn-cuda13;extra=="cuda"']
    try:
        version = importlib.metadata.version("fusedrnn-cuda13")
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version is None:
        assert _cuda_layer.locate_cuda_module() in (None, ("fusedrnn._cuda", None))
        return
    assert version == VERSION
    requires = {}
    for r in importlib.metadata.requires("fusedrnn-cuda13"):
        name, specifiers = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", r).groups()
        requires[name] = sorted(s.strip() for s in specifiers.split(","))
    assert requires == {"fusedrnn": [f"=={VERSION}"], "nvidia-cublas": ["<14", ">=13"]}

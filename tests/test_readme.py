"""The README's Python examples run as written and do what their comments say.

Each example leaves a few names to the reader (a torch model, a list of sequences, x): a prelude here
makes them, the example's own text runs unchanged after it, and checks on what it made follow. Every
Python block of the README must have an entry below, so a new or edited example is run, not trusted.
The CUDA example runs on the host stand-ins for CuPy and the CUDA module (fake_cuda) everywhere, and on
a GPU with CuPy where there is one."""

import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

import fake_cuda
import fusedrnn

README = Path(__file__).resolve().parents[1] / "README.md"


def python_examples() -> list[str]:
    text = README.read_text(encoding="utf-8")
    return [textwrap.dedent(block) for block in re.findall(r"```python\n(.*?)```", text, re.S)]


def example(first_line: str) -> str:
    """The one README example whose first code line starts with `first_line`."""
    found = [e for e in python_examples() if e.lstrip().startswith(first_line)]
    assert len(found) == 1, f"{len(found)} README examples start with {first_line!r}"
    return found[0]


def run(code: str, names: dict) -> dict:
    exec(compile(code, str(README), "exec"), names)
    return names


# The first code line of each example, as the tests below find it.
NUMPY_MODULES = "import numpy as np, fusedrnn\n\nlstm = fusedrnn.LSTM("
TRAINING = "import numpy as np, fusedrnn\nfrom fusedrnn import sequences"
TORCH = "import torch, fusedrnn.torch as frt"
CUDA = "lstm, head = fusedrnn.LSTM(64, 256, num_layers=2).to(\"cuda\")"
JAX = "import jax, fusedrnn.jax as fj"


def test_every_example_is_run_here():
    starts = [NUMPY_MODULES, TRAINING, TORCH, CUDA, JAX]
    examples = python_examples()
    assert len(examples) == len(starts)
    for code in examples:
        assert sum(code.lstrip().startswith(s) for s in starts) == 1, code[:200]


def test_stated_requirements_are_pyprojects():
    """The wheels' requirements as the README states them are the ones pyproject.toml declares."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    with open(README.with_name("pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["dependencies"]
    stated = re.search(r"\*\*What they need\*\*: (.*?), nothing else", README.read_text(encoding="utf-8"))
    assert stated, "the README's 'What they need' line is gone"
    assert re.findall(r"`([^`]+)`", stated.group(1)) == declared


def test_numpy_modules_example():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    torch_lstm = torch.nn.LSTM(64, 128, num_layers=2, bidirectional=True)
    ns = run(example(NUMPY_MODULES), {"torch_lstm": torch_lstm})
    lstm = ns["lstm"]
    assert ns["dx"].shape == (50, 8, 64) and ns["dh0"].shape == ns["dc0"].shape == (4, 8, 128)
    assert ns["dy"].shape == (50, 8, 256)  # the LSTM's y, both directions' features
    assert lstm.grads["weight_hh_l1_reverse"].shape == (512, 128) and lstm.grads["weight_hh_l1_reverse"].any()
    assert ns["y"].shape == (50, 8, 128) and ns["h_n"].shape == (1, 8, 128)  # the GRU's
    assert ns["rnn"].dtype == np.float64
    for name, value in torch_lstm.state_dict().items():  # "a torch module's weights load as they are"
        np.testing.assert_array_equal(lstm.state_dict()[name], value.numpy())
    assert not lstm.training and fusedrnn.get_num_threads() == 2


def test_training_example():
    rng = np.random.default_rng(0)
    list_of_arrays = [rng.standard_normal((n, 3)).astype(np.float32) for n in (5, 9, 2, 7)]
    ns = run(example(TRAINING), {"list_of_arrays": list_of_arrays})
    x, lengths = ns["x"], ns["lengths"]
    assert x.shape == (9, 4, 3) and list(lengths) == [5, 9, 2, 7]
    for b, seq in enumerate(list_of_arrays):
        np.testing.assert_array_equal(x[:len(seq), b], seq)
    assert ns["inputs"].shape == ns["targets"].shape == (200, 9, 1)
    # Twenty epochs of next-step prediction of a sine: far below the series' variance (0.5).
    assert np.mean(ns["result"].losses) < 0.01


def test_torch_example():
    torch = pytest.importorskip("torch")
    import fusedrnn.torch as frt
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.encoder = torch.nn.LSTM(256, 512, batch_first=True)
    model.decoder = torch.nn.GRU(1024, 32, batch_first=True)
    batch, steps, samples = 2, 5, 3
    names = {"model": model, "x": torch.randn(batch, steps, 256), "h0": torch.zeros(4, batch, 512),
             "c0": torch.zeros(4, batch, 512), "xs": torch.randn(samples, steps, 1, 64, dtype=torch.float64),
             "targets": torch.randn(samples, steps, 1, 128, dtype=torch.float64)}
    ns = run(example(TORCH), names)
    assert isinstance(model.encoder, frt.LSTM) and model.encoder.bidirectional
    assert isinstance(model.decoder, frt.GRU)  # swapped by convert()
    assert ns["out"].shape == (batch, steps, 1024) and ns["h"].shape == (4, batch, 512)
    per_sample = ns["per_sample"]
    assert per_sample["weight_ih_l0"].shape == (samples, 3 * 128, 64)
    # Each sample's gradients are that sample's own.
    gru, loss, params = ns["gru"], ns["loss"], ns["params"]
    for s in range(samples):
        own = torch.func.grad(loss)(params, names["xs"][s], names["targets"][s])
        for name, grad in own.items():
            torch.testing.assert_close(per_sample[name][s], grad, rtol=1e-10, atol=1e-10)
    assert gru.weight_ih_l0.dtype == torch.float64


@pytest.fixture(params=["emulated", "gpu"])
def cupy_module(request, monkeypatch):
    if request.param == "emulated":
        return fake_cuda.installed(monkeypatch)
    if not fusedrnn.build_info()["cuda"]["loaded"]:
        pytest.skip("needs a GPU, the CUDA module and CuPy")
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # not installed, or no usable device
        pass
    pytest.skip("needs a GPU, the CUDA module and CuPy")


def test_cuda_example(cupy_module, rng):
    x = rng.standard_normal((20, 4, 64)).astype(np.float32)
    target = rng.standard_normal((20, 4, 1)).astype(np.float32)
    ns = run(example(CUDA), {"fusedrnn": fusedrnn, "cupy": cupy_module, "x": x, "target": target})
    lstm, head, y, opt = ns["lstm"], ns["head"], ns["y"], ns["opt"]
    assert lstm.device.startswith("cuda") and type(y) is type(cupy_module.asarray(x))
    assert y.shape == (20, 4, 256) and np.isfinite(float(ns["loss"])) and opt.steps == 1
    grads = [fusedrnn._device.to_host(g) for g in (*lstm.grads.values(), *head.grads.values())]
    total = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    assert 0 < total <= 1.0 + 1e-5  # clipped to a norm of 1 before the step


def test_jax_example():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import fusedrnn.jax as fj
    rng = np.random.default_rng(0)
    names = {"x": jnp.asarray(rng.standard_normal((6, 3, 64)), jnp.float32), "lengths": jnp.array([6, 4, 1]),
             "key": jax.random.key(1), "loss_fn": lambda y: jnp.sum(y ** 2),
             "gru_params": fj.init(jax.random.key(2), "gru", 64, 128),
             "xs": jnp.asarray(rng.standard_normal((4, 6, 1, 64)), jnp.float32)}
    ns = run(example(JAX), names)
    assert ns["y"].shape == (6, 3, 256) and ns["h_n"].shape == (4, 3, 128)
    assert not np.asarray(ns["y"])[1:, 2].any()  # past row 2's length of one step
    assert ns["ys"].shape == (4, 6, 1, 128)
    assert set(ns["grads"]) == set(ns["params"]) and np.isfinite(float(ns["loss"]))
    per_sample, params, loss_fn = ns["per_sample"], ns["params"], names["loss_fn"]
    own = jax.grad(lambda p, x: loss_fn(fj.lstm(p, x)[0]))(params, names["xs"][1])
    for name, grad in own.items():
        assert per_sample[name].shape == (4, *grad.shape)
        np.testing.assert_allclose(np.asarray(per_sample[name][1]), np.asarray(grad), rtol=2e-4, atol=2e-5)

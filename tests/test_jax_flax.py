"""fusedrnn.jax with Flax and optax: parameters converted to and from Flax's LSTM and GRU cells give the
same outputs when both run (a projected LSTM's in Flax's layout with a bias-free Dense projection); the
linen and NNX modules (torch-named parameters, an LSTM's projection included) match the functional call
and train with optax; the optax sunspot demo's short run; the benchmark's JAX peers (fusedrnn.jax, jit
over lax.scan, Flax)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
optax = pytest.importorskip("optax")
import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import fusedrnn.jax as fj  # noqa: E402
from fusedrnn.jax import flax_params  # noqa: E402
from fusedrnn.jax import linen as flinen  # noqa: E402
from fusedrnn.jax import nnx as fnnx  # noqa: E402
from helpers import assert_close  # noqa: E402

FLAX_CELLS = {"lstm": (nn.OptimizedLSTMCell, nn.LSTMCell), "gru": (nn.GRUCell,)}


def _run_flax(cell_cls, hidden, tree, x_btf):
    model = nn.RNN(cell_cls(hidden), return_carry=True)
    return model.apply({"params": {"cell": tree}}, x_btf)


@pytest.mark.parametrize("cell", list(FLAX_CELLS))
def test_converted_parameters_run_the_same_in_flax_and_fusedrnn(rng, cell):
    inp, hidden, batch, steps = 3, 5, 4, 7
    params = fj.init(jax.random.key(1), cell, inp, hidden)
    # Distinct biases on both sides, so a misplaced one shows.
    params["bias_ih_l0"] = jnp.asarray(rng.uniform(-1, 1, params["bias_ih_l0"].shape), jnp.float32)
    params["bias_hh_l0"] = jnp.asarray(rng.uniform(-1, 1, params["bias_hh_l0"].shape), jnp.float32)
    x = rng.standard_normal((steps, batch, inp)).astype(np.float32)
    y, state = fj.forward(cell, params, x)
    h_n = state[0] if cell == "lstm" else state
    for cell_cls in FLAX_CELLS[cell]:
        carry, y_flax = _run_flax(cell_cls, hidden, flax_params.to_flax(cell, params), x.transpose(1, 0, 2))
        h_flax = carry[1] if cell == "lstm" else carry            # Flax's LSTM carry is (c, h)
        assert_close(y, np.asarray(y_flax).transpose(1, 0, 2), np.float32, f"{cell_cls.__name__} y")
        assert_close(h_n[0], h_flax, np.float32, f"{cell_cls.__name__} h_n")
        if cell == "lstm":
            assert_close(state[1][0], carry[0], np.float32, "c_n")

    # And back: Flax's own initialisation, converted, runs the same in fusedrnn.
    flax_cell = FLAX_CELLS[cell][0](hidden)
    tree = nn.RNN(flax_cell).init(jax.random.key(2), x.transpose(1, 0, 2))["params"]["cell"]
    tree = jax.tree.map(lambda a: a + 0.1 * jnp.asarray(rng.standard_normal(a.shape), a.dtype), tree)
    _, y_flax = _run_flax(FLAX_CELLS[cell][0], hidden, tree, x.transpose(1, 0, 2))
    converted = flax_params.from_flax(cell, tree)
    assert sorted(converted) == sorted(fj.param_names(1))
    y2, _ = fj.forward(cell, converted, x)
    assert_close(y2, np.asarray(y_flax).transpose(1, 0, 2), np.float32, "from_flax y")
    # The round trip keeps the function and Flax's tree exactly.
    back = flax_params.to_flax(cell, converted)
    jax.tree.map(np.testing.assert_array_equal, back, tree)


class _ProjectedLSTMCell(nn.Module):
    """Flax's LSTMCell layout (input kernels "i*" without bias, recurrent "h*" with one) read from a
    projected h, the output o*tanh(c) projected by the bias-free Dense "proj": what to_flax's entries mean
    for an LSTM with a projection (Flax's own cells keep h as wide as c, so they cannot run it)."""
    hidden: int
    proj: int

    @nn.compact
    def __call__(self, carry, x):
        c, h = carry
        gates = [nn.Dense(self.hidden, use_bias=False, name="i" + g)(x) + nn.Dense(self.hidden, name="h" + g)(h)
                 for g in "ifgo"]
        i, f, g, o = gates
        c = nn.sigmoid(f) * c + nn.sigmoid(i) * jnp.tanh(g)
        return c, nn.Dense(self.proj, use_bias=False, name="proj")(nn.sigmoid(o) * jnp.tanh(c))


@pytest.mark.parametrize("reverse", [False, True])
def test_projected_lstm_parameters_convert_to_flax_layout_with_a_projection_and_back(rng, reverse):
    inp, hidden, proj, batch, steps = 3, 5, 2, 4, 6
    params = fj.init(jax.random.key(1), "lstm", inp, hidden, bidirectional=True, proj_size=proj)
    suffix = "_l0_reverse" if reverse else "_l0"
    params["bias_hh" + suffix] = jnp.asarray(rng.uniform(-1, 1, 4 * hidden), jnp.float32)
    x = rng.standard_normal((steps, batch, inp)).astype(np.float32)
    y, (h_n, c_n) = fj.lstm(params, x)
    d = int(reverse)
    tree = flax_params.to_flax("lstm", params, reverse=reverse)
    assert tree["proj"]["kernel"].shape == (hidden, proj) and tree["hi"]["kernel"].shape == (proj, hidden)
    model = _ProjectedLSTMCell(hidden, proj)
    carry, outputs = (jnp.zeros((batch, hidden)), jnp.zeros((batch, proj))), [None] * steps
    for t in (reversed(range(steps)) if reverse else range(steps)):
        carry = model.apply({"params": tree}, carry, x[t])
        outputs[t] = carry[1]
    assert_close(y[..., d * proj:(d + 1) * proj], jnp.stack(outputs), np.float32, "y")
    assert_close(h_n[d], carry[1], np.float32, "h_n")
    assert_close(c_n[d], carry[0], np.float32, "c_n")
    # And back: the same function (torch's two biases summed into bias_ih), weight_hr exactly.
    back = flax_params.from_flax("lstm", tree, reverse=reverse)
    assert sorted(back) == sorted(k + suffix for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"))
    np.testing.assert_array_equal(np.asarray(back["weight_hr" + suffix]), np.asarray(params["weight_hr" + suffix]))
    y_back, _ = fj.lstm({**params, **back}, x)
    assert_close(y_back, y, np.float32, "round trip y")


def test_converters_refuse_what_they_cannot_map():
    with pytest.raises(ValueError, match="cell: Flax cells exist for"):
        flax_params.to_flax("rnn_tanh", fj.init(jax.random.key(0), "rnn_tanh", 2, 3))
    with pytest.raises(ValueError, match="flax_params: expected the entries"):
        flax_params.from_flax("gru", {"ii": {"kernel": jnp.zeros((2, 3))}})
    gru = fj.init(jax.random.key(0), "gru", 2, 3)
    with pytest.raises(ValueError, match="params: weight_hr_l0 given, but 'gru' takes no projection"):
        flax_params.to_flax("gru", {**gru, "weight_hr_l0": jnp.zeros((1, 3))})
    tree = {**flax_params.to_flax("gru", gru), "proj": {"kernel": jnp.zeros((3, 1))}}
    with pytest.raises(ValueError, match="flax_params: expected the entries"):
        flax_params.from_flax("gru", tree)
    with pytest.raises(ValueError, match=r"params: no 'weight_ih_l3' for layer 3 \(the params hold"):
        flax_params.to_flax("gru", gru, layer=3)
    with pytest.raises(ValueError, match=r"params: no 'weight_ih_l0_reverse' for layer 0 reverse"):
        flax_params.to_flax("gru", gru, reverse=True)
    # Another cell's parameters, or a shape that disagrees, are refused by name, not converted.
    lstm = fj.init(jax.random.key(0), "lstm", 3, 6)
    with pytest.raises(ValueError, match=r"weight_hh_l0: expected shape \(24, 8\) for a gru of hidden size 8"):
        flax_params.to_flax("gru", lstm)
    with pytest.raises(ValueError, match=r"weight_hh_l0: expected 4\*hidden_size rows"):
        flax_params.to_flax("lstm", fj.init(jax.random.key(0), "gru", 3, 5))
    with pytest.raises(ValueError, match=r"bias_ih_l0: expected shape \(9,\)"):
        flax_params.to_flax("gru", {**gru, "bias_ih_l0": jnp.zeros(8)})
    with pytest.raises(ValueError, match=r"weight_hr_l0: expected shape \(2, 6\)"):
        flax_params.to_flax("lstm", {**lstm, "weight_hh_l0": jnp.zeros((24, 2)), "weight_hr_l0": jnp.zeros((2, 5))})
    for proj in (6, 7):  # a projection no narrower than the cell: torch.nn and fusedrnn.jax refuse it too
        projected = {**lstm, "weight_hh_l0": jnp.zeros((24, proj)), "weight_hr_l0": jnp.zeros((proj, 6))}
        with pytest.raises(ValueError, match=rf"weight_hr_l0: expected shape \(proj_size, 6\) with 0 < proj_size"):
            flax_params.to_flax("lstm", projected)
        tree = {**flax_params.to_flax("lstm", lstm), "proj": {"kernel": jnp.zeros((6, proj))}}
        tree.update({"h" + g: {**tree["h" + g], "kernel": jnp.zeros((proj, 6))} for g in "ifgo"})
        with pytest.raises(ValueError, match=r"flax_params\['proj'\]\['kernel'\]: expected shape \(6, proj_size\)"):
            flax_params.from_flax("lstm", tree)


def test_nnx_modules_check_dropout_and_its_stream_at_construction():
    with pytest.raises(ValueError, match=r"^dropout: expected a probability in \[0, 1\], got 2.0"):
        fnnx.LSTM(2, 3, num_layers=2, dropout=2.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"^rngs: dropout needs a 'dropout' stream"):
        fnnx.GRU(2, 3, num_layers=2, dropout=0.5, rngs=nnx.Rngs(params=0))
    model = fnnx.GRU(2, 3, num_layers=2, dropout=0.5, rngs=nnx.Rngs(params=0, dropout=1))
    assert model(jnp.ones((4, 1, 2)))[0].shape == (4, 1, 3)


def test_nnx_module_has_torch_names_matches_the_functional_call_and_trains_with_optax(rng):
    model = fnnx.GRU(2, 8, num_layers=2, bidirectional=True, dropout=0.25, rngs=nnx.Rngs(0))
    names = fj.param_names(2, bidirectional=True)
    params = nnx.state(model, nnx.Param)
    assert sorted(params.keys()) == sorted(names)
    assert model.weight_ih_l1_reverse[...].shape == (24, 16)

    x = rng.standard_normal((6, 4, 2)).astype(np.float32)
    model.eval()
    y_eval, h_eval = model(x)
    y_fn, h_fn = fj.gru(model.state_dict(), x)
    np.testing.assert_array_equal(np.asarray(y_eval), np.asarray(y_fn))
    model.train()
    y_train, _ = model(x)
    assert not np.array_equal(np.asarray(y_train), np.asarray(y_eval))   # dropout between layers

    target = jnp.asarray(rng.standard_normal((6, 4, 16)).astype(np.float32))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x):
        def loss_fn(model):
            y, _ = model(x, deterministic=True)
            return jnp.mean((y - target) ** 2)
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, x)) for _ in range(30)]
    assert losses[-1] < 0.8 * losses[0]

    model.load_state_dict({k: jnp.zeros_like(v) for k, v in model.state_dict().items()})
    np.testing.assert_array_equal(np.asarray(model(x, deterministic=True)[0]), 0.0)
    with pytest.raises(ValueError, match=r"^state_dict: missing keys \['weight_hh_l0', .*\], unexpected keys \[\]$"):
        model.load_state_dict({"weight_ih_l0": jnp.zeros((24, 2))})


def test_nnx_load_state_dict_checks_as_the_numpy_modules_do(rng):
    from fusedrnn.modules import IncompatibleKeys

    model = fnnx.LSTM(3, 4, rngs=nnx.Rngs(0))
    before = model.state_dict()
    new = {k: jnp.full_like(v, 0.5) for k, v in before.items()}
    bad_cases = [
        ([1, 2], TypeError, r"^state_dict: expected a mapping of name -> array, got list$"),
        ({**new, "weight_hh_l0": np.zeros((16, 4), np.int32)}, TypeError,
         r"^state_dict\['weight_hh_l0'\]: expected dtype float32 \(the parameter's\), got int32$"),
        # Compared as given: without jax_enable_x64 JAX would turn float64 into float32 first.
        ({**new, "weight_hh_l0": np.zeros((16, 4))}, TypeError,
         r"^state_dict\['weight_hh_l0'\]: expected dtype float32 \(the parameter's\), got float64$"),
        ({**new, "bias_hh_l0": jnp.zeros(15)}, ValueError,
         r"^state_dict\['bias_hh_l0'\]: expected shape \(16,\), got \(15,\)$"),
        ({**new, "weight_hh_l0": new["weight_hh_l0"].at[3, 1].set(jnp.nan)}, ValueError,
         r"^state_dict\['weight_hh_l0'\]: contains NaN or infinite values$"),
        ({**new, "bias_ih_l0": np.full(16, np.inf, np.float32)}, ValueError,
         r"^state_dict\['bias_ih_l0'\]: contains NaN"),
        ({**new, "extra": jnp.zeros(1)}, ValueError, r"^state_dict: missing keys \[\], unexpected keys \['extra'\]$"),
    ]
    for state_dict, error, message in bad_cases:
        with pytest.raises(error, match=message):
            model.load_state_dict(state_dict)
        for name, value in model.state_dict().items():  # all checked before any is written
            np.testing.assert_array_equal(np.asarray(value), np.asarray(before[name]), err_msg=name)
    with pytest.raises(TypeError, match=r"^strict: expected a bool, got str$"):
        model.load_state_dict(new, strict="no")
    assert model.load_state_dict(new) == IncompatibleKeys([], [])
    partial = {"weight_ih_l0": jnp.zeros((16, 3)), "extra": jnp.zeros(1)}
    result = model.load_state_dict(partial, strict=False)
    assert result == IncompatibleKeys(["weight_hh_l0", "bias_ih_l0", "bias_hh_l0"], ["extra"])
    np.testing.assert_array_equal(np.asarray(model.weight_ih_l0[...]), 0.0)
    np.testing.assert_array_equal(np.asarray(model.weight_hh_l0[...]), 0.5)


def test_nnx_modules_check_their_options():
    cases = [
        (lambda: fnnx.GRU(3, 4, cell_clip=1.0, rngs=nnx.Rngs(0)), ValueError, r"^cell_clip: 'gru' has no cell state"),
        (lambda: fnnx.LSTM(3, 4, cell_clip=-1.0, rngs=nnx.Rngs(0)), ValueError,
         r"^cell_clip: expected a positive finite bound, got -1.0"),
        (lambda: fnnx.LSTM(3, 4, batch_first="no", rngs=nnx.Rngs(0)), TypeError,
         r"^batch_first: expected a bool, got str"),
        (lambda: fnnx.LSTM(3, 4, bias="no", rngs=nnx.Rngs(0)), TypeError, r"^bias: expected a bool, got str"),
        (lambda: fnnx.GRU(3, 4, bias=None, rngs=nnx.Rngs(0)), TypeError, r"^bias: expected a bool, got NoneType"),
        (lambda: fnnx.RNN(3, 4, bidirectional="no", rngs=nnx.Rngs(0)), TypeError,
         r"^bidirectional: expected a bool, got str"),
    ]
    for make, error, message in cases:
        with pytest.raises(error, match=message):
            make()
    model = fnnx.LSTM(3, 4, bias=np.bool_(False), bidirectional=np.bool_(True), cell_clip=2, rngs=nnx.Rngs(0))
    assert sorted(model.state_dict()) == sorted(fj.param_names(bias=False, bidirectional=True))
    assert model.bias is False and model.bidirectional is True and model.cell_clip == 2.0
    # deterministic is read where dropout can run, and then must be a static bool; elsewhere it changes
    # nothing and is not looked at (nnx.jit may pass it traced).
    dropping = fnnx.LSTM(3, 4, num_layers=2, dropout=0.5, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"^deterministic: expected a bool, got str"):
        dropping(jnp.ones((5, 2, 3)), deterministic="no")
    with pytest.raises(TypeError, match=r"^deterministic: expected a Python bool \(a static option"):
        nnx.jit(lambda m, d: m(jnp.ones((5, 2, 3)), deterministic=d)[0])(dropping, True)
    y = nnx.jit(lambda m, d: m(jnp.ones((5, 2, 3)), deterministic=d)[0])(model, True)
    assert y.shape == (5, 2, 8)


def test_nnx_lstm_with_a_projection_has_torchs_parameters_and_the_functional_gradients(rng):
    torch = pytest.importorskip("torch")
    model = fnnx.LSTM(2, 6, num_layers=2, bidirectional=True, proj_size=3, rngs=nnx.Rngs(0))
    reference = torch.nn.LSTM(2, 6, 2, bidirectional=True, proj_size=3)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == \
        [(k, tuple(v.shape)) for k, v in reference.state_dict().items()]
    x = rng.standard_normal((5, 4, 2)).astype(np.float32)
    y, (h_n, c_n) = model(x)
    assert y.shape == (5, 4, 6) and h_n.shape == (4, 4, 3) and c_n.shape == (4, 4, 6)
    grads = nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2))(model)
    expected = jax.grad(lambda p: jnp.sum(fj.lstm(p, x)[0] ** 2))(model.state_dict())
    for name, g in expected.items():
        np.testing.assert_array_equal(np.asarray(grads[name][...]), np.asarray(g), err_msg=name)
    assert float(jnp.abs(expected["weight_hr_l1_reverse"]).sum()) > 0
    model.load_state_dict({**model.state_dict(), "weight_hr_l1": jnp.zeros((3, 6)),
                           "weight_hr_l1_reverse": jnp.zeros((3, 6))})
    np.testing.assert_array_equal(np.asarray(model(x)[0]), 0.0)      # the last layer projects onto zero
    with pytest.raises(ValueError, match="proj_size: 'gru' takes no projection"):
        fnnx.GRU(2, 6, proj_size=3, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("module, cell, proj", [
    (flinen.LSTM, "lstm", 0), (lambda h, **o: flinen.LSTM(h, proj_size=3, **o), "lstm", 3), (flinen.GRU, "gru", 0),
    (lambda h, **o: flinen.RNN(h, nonlinearity="relu", **o), "rnn_relu", 0)])
def test_linen_modules_have_torch_names_and_match_the_functional_call_with_grads(rng, module, cell, proj):
    model = module(5, num_layers=2, bidirectional=True, batch_first=True)
    x = rng.standard_normal((3, 6, 4)).astype(np.float32)                    # (B, T, I)
    lengths = np.array([6, 2, 4])
    h0 = rng.standard_normal((4, 3, proj or 5)).astype(np.float32)
    hx = (h0, rng.standard_normal((4, 3, 5)).astype(np.float32)) if cell == "lstm" else h0
    variables = model.init(jax.random.key(0), x)
    params = variables["params"]
    shapes = fj.param_shapes(cell, 4, 5, 2, bidirectional=True, proj_size=proj)
    assert {k: v.shape for k, v in params.items()} == shapes
    bound = 1 / np.sqrt(5)
    assert all(float(jnp.abs(v).max()) <= bound for v in params.values())
    assert len({float(v.ravel()[0]) for v in params.values()}) == len(params)   # one key per parameter

    def loss(apply_out):
        y, state = apply_out
        return jnp.sum(y ** 2) + sum(jnp.sum(s) for s in jax.tree.leaves(state))

    def via_module(p, x):
        return loss(model.apply({"params": p}, x, hx, lengths=lengths))

    def via_function(p, x):
        return loss(fj.forward(cell, p, x, hx, lengths=lengths, batch_first=True))

    out = model.apply(variables, x, hx, lengths=lengths)
    expected = fj.forward(cell, params, x, hx, lengths=lengths, batch_first=True)
    jax.tree.map(np.testing.assert_array_equal, out, expected)
    grads = jax.jit(jax.grad(via_module, argnums=(0, 1)))(params, x)
    expected_grads = jax.jit(jax.grad(via_function, argnums=(0, 1)))(params, x)
    jax.tree.map(np.testing.assert_array_equal, grads, expected_grads)
    assert float(jnp.abs(grads[0]["weight_hh_l1_reverse"]).sum()) > 0


def test_linen_dropout_draws_from_the_dropout_stream_and_needs_it(rng):
    model = flinen.GRU(8, num_layers=2, dropout=0.5)
    x = rng.standard_normal((6, 4, 2)).astype(np.float32)
    variables = model.init(jax.random.key(0), x, deterministic=True)
    y_eval, _ = model.apply(variables, x, deterministic=True)
    np.testing.assert_array_equal(np.asarray(y_eval), np.asarray(fj.gru(variables["params"], x)[0]))
    y1, _ = model.apply(variables, x, rngs={"dropout": jax.random.key(1)})
    y1_again, _ = model.apply(variables, x, rngs={"dropout": jax.random.key(1)})
    y2, _ = model.apply(variables, x, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y1_again))
    assert not np.array_equal(np.asarray(y1), np.asarray(y_eval))
    assert not np.array_equal(np.asarray(y1), np.asarray(y2))
    with pytest.raises(ValueError, match="rngs: dropout needs a 'dropout' stream"):
        model.apply(variables, x)
    eval_model = flinen.GRU(8, num_layers=2, dropout=0.5, deterministic=True)
    np.testing.assert_array_equal(np.asarray(eval_model.apply(variables, x)[0]), np.asarray(y_eval))
    with pytest.raises(ValueError, match="nonlinearity: expected 'tanh' or 'relu'"):
        flinen.RNN(4, nonlinearity="sigmoid").init(jax.random.key(0), x)
    # torch's positional order past num_layers would fill other fields here: refused, never run silently.
    for make in (lambda: flinen.RNN(6, 1, "relu"), lambda: flinen.LSTM(6, 1, True), lambda: flinen.GRU(6, 1, True)):
        with pytest.raises(TypeError, match="positional argument"):
            make()
    with pytest.raises(ValueError, match=r"^dropout: expected a probability in \[0, 1\], got 1.5"):
        flinen.GRU(8, num_layers=2, dropout=1.5).init(jax.random.key(0), x)


def test_linen_modules_refuse_bad_x_options_and_param_dtype_by_name(rng):
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    model = flinen.LSTM(4)
    variables = model.init(jax.random.key(0), x)
    for bad in (x[..., :2], np.zeros((5, 2, 5), np.float32)):   # flax would blame weight_ih_l0
        with pytest.raises(ValueError, match=rf"^x: expected input_size 3 in the last dimension \(weight_ih_l0 is "
                                             rf"\(16, 3\)\), got {bad.shape[-1]}\b"):
            model.apply(variables, bad)
    for bad in (x[:, 0, 0], x[None]):
        with pytest.raises(ValueError, match=r"^x: expected a 2-D or 3-D array, got shape"):
            model.apply(variables, bad)
        with pytest.raises(ValueError, match=r"^x: expected a 2-D or 3-D array, got shape"):
            model.init(jax.random.key(0), bad)
    for dtype in (np.float16, "int32", jnp.bfloat16):
        with pytest.raises(TypeError, match=r"^param_dtype: expected float32 or float64, got "):
            flinen.LSTM(4, param_dtype=dtype).init(jax.random.key(0), x)
    for option, value in (("bias", "no"), ("bidirectional", "no"), ("bias", None), ("deterministic", "no")):
        with pytest.raises(TypeError, match=rf"^{option}: expected a bool, got {type(value).__name__}"):
            flinen.GRU(4, num_layers=2, dropout=0.5, **{option: value}).init(jax.random.key(0), x)
    dropping = flinen.GRU(4, num_layers=2, dropout=0.5)
    with pytest.raises(TypeError, match=r"^deterministic: expected a bool, got str"):
        dropping.apply(dropping.init(jax.random.key(0), x, deterministic=True), x, deterministic="no")
    shapes = jax.eval_shape(flinen.GRU(4).init, jax.random.key(0), x, deterministic=True)  # traces the kwargs
    assert shapes["params"]["weight_hh_l0"].shape == (12, 4)
    no_bias = flinen.GRU(4, bias=np.bool_(False)).init(jax.random.key(0), x)["params"]
    assert sorted(no_bias) == ["weight_hh_l0", "weight_ih_l0"]


def test_flax_modules_take_check_finite_as_the_functional_call_does(rng):
    """NaN in x is a ValueError by default (an eager call on the CPU); check_finite=False lets it
    through to the outputs, as fusedrnn.jax.forward's option does."""
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    x[2, 1, 0] = np.nan
    linen_model = flinen.GRU(4)
    variables = linen_model.init(jax.random.key(0), np.zeros_like(x))
    nnx_model = fnnx.GRU(3, 4, rngs=nnx.Rngs(0))
    for run in (lambda **kw: linen_model.apply(variables, x, **kw), lambda **kw: nnx_model(x, **kw)):
        with pytest.raises(ValueError, match=r"^x: contains NaN or infinite values"):
            run()
        y, h_n = run(check_finite=False)
        assert np.isnan(y[2:, 1]).all() and np.isfinite(y[:, 0]).all() and np.isfinite(y[:2]).all()
        with pytest.raises(TypeError, match=r"^check_finite: expected a bool, got str"):
            run(check_finite="no")


def test_nnx_view_and_a_key_as_rngs_work_as_for_nnx_dropout(rng):
    model = fnnx.LSTM(2, 3, num_layers=2, dropout=0.5, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((4, 2, 2)).astype(np.float32))
    want = fj.lstm(model.state_dict(), x)[0]
    view = nnx.view(model, deterministic=True)
    np.testing.assert_array_equal(np.asarray(view(x)[0]), np.asarray(want))
    assert not model.deterministic  # the view is a copy; the model still drops out
    key = jax.random.key(5)
    y = model(x, rngs=key)[0]
    np.testing.assert_array_equal(np.asarray(y), np.asarray(model(x, rngs=key)[0]))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(
        fj.lstm(model.state_dict(), x, dropout=0.5, dropout_key=key)[0]))
    with pytest.raises(TypeError, match="rngs: expected an nnx.Rngs, an nnx.RngStream or a PRNG key, got int"):
        model(x, rngs=3)
    assert "deterministic" in str(nnx.view_info(nnx.Sequential(model)))
    with pytest.raises(TypeError, match=r"^rngs: expected an nnx.Rngs \(its 'params' stream"):
        fnnx.GRU(2, 3, rngs=key)


def test_optax_sunspot_demo_short_run_learns_and_shares_the_numpy_demos_split_and_baselines():
    from fusedrnn import datasets, demo
    from fusedrnn.jax import demo as jax_demo

    config = demo.ForecastConfig(hidden=8, epochs=6, held_out_years=30, batch=64, members=2)
    seen = []
    result = jax_demo.train_forecaster(config, lambda epoch, loss: seen.append((epoch, loss)))
    assert [e for e, _ in seen] == list(range(12)) and all(np.isfinite(loss) for _, loss in seen)
    assert result.losses == [loss for _, loss in seen]
    assert seen[5][1] < 0.7 * seen[0][1] and seen[11][1] < 0.7 * seen[6][1]   # each member learns
    _, series = datasets.sunspots()
    assert result.years.tolist() == list(range(1979, 2009))
    np.testing.assert_array_equal(result.truth, series[-30:])
    numpy_baselines = demo.train_forecaster(demo.ForecastConfig(hidden=2, epochs=1, held_out_years=30, members=1))
    assert result.baselines.keys() == numpy_baselines.baselines.keys()
    for name, values in result.baselines.items():
        np.testing.assert_array_equal(values, numpy_baselines.baselines[name])
    assert result.forecast.shape == (30,) and np.all(np.isfinite(result.forecast))
    assert result.rmse["model"] == pytest.approx(demo.rmse(result.forecast, result.truth))
    # Better than repeating the last value even after this short run.
    assert result.rmse["model"] < result.rmse["repeat last value"]
    with pytest.raises(ValueError, match="cell: expected one of"):
        jax_demo.train_forecaster(demo.ForecastConfig(cell="transformer"))


def test_jax_demo_refuses_bad_numbers_in_one_line(capsys):
    from fusedrnn.jax import demo as jax_demo
    for argv, error in ((["--members", "0"], "members: expected an int >= 1"),
                        (["--hidden", "0"], "hidden: expected an int >= 1"),
                        (["--seed", "-1"], "seed: expected an int >= 0")):
        with pytest.raises(SystemExit) as stop:
            jax_demo.main(argv)
        assert stop.value.code == 2 and capsys.readouterr().err.strip().endswith(error + ", got " + argv[1])


def test_bench_times_the_jax_peers(tmp_path):
    import json

    from fusedrnn import cli

    out = tmp_path / "bench.json"
    argv = ["bench", "--cell", "lstm", "gru", "rnn_relu", "--shape", "3,2,4,4", "--peers", "fusedrnn.jax", "jax",
            "flax", "fusedrnn", "--rounds", "1", "--repeats", "1", "--json", str(out)]
    assert cli.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6
    for row in rows:
        for peer in ("fusedrnn.jax", "jax", "flax", "fusedrnn"):
            assert row[f"{peer}_ms"] > 0
        assert row["speedup_vs_flax"] == pytest.approx(row["flax_ms"] / row["fusedrnn.jax_ms"])
    # An LSTM with a projection (the "projection" set's rows): fusedrnn.jax and jit over lax.scan time it
    # (Flax's cells have no projection).
    from fusedrnn import benchmark

    rows = benchmark.run_case(benchmark.Case("lstm", 3, 2, 4, 4, proj_size=2), ["fusedrnn.jax", "jax", "fusedrnn"],
                              rounds=1, repeats=1)
    assert [(row["cell"], row["mode"]) for row in rows] == [("LSTMP2", "inference"), ("LSTMP2", "training")]
    assert all(row[f"{peer}_ms"] > 0 for row in rows for peer in ("fusedrnn.jax", "jax", "fusedrnn"))


def test_from_flax_checks_every_entry_by_name():
    """A Flax tree whose entries disagree (a kernel or bias of another size, a Dense without its bias)
    is refused naming the entry, as to_flax refuses torch-named parameters, not converted into
    malformed weights or left to fail elsewhere."""
    gru = flax_params.to_flax("gru", fj.init(jax.random.key(1), "gru", 4, 6))
    lstm = flax_params.to_flax("lstm", fj.init(jax.random.key(1), "lstm", 4, 6, proj_size=3))
    cases = [
        ("gru", {**gru, "hz": {"kernel": jnp.ones((6, 7))}},
         r"^flax_params\['hz'\]\['kernel'\]: expected shape \(6, 6\)"),
        ("gru", {**gru, "ir": {"kernel": jnp.ones((4, 6))}}, r"^flax_params\['ir'\]: expected a 'bias' entry"),
        ("gru", {**gru, "in": jnp.ones(3)}, r"^flax_params\['in'\]: expected a 'kernel' entry"),
        ("lstm", {**lstm, "hi": {"kernel": lstm["hi"]["kernel"], "bias": jnp.ones(3)}},
         r"^flax_params\['hi'\]\['bias'\]: expected shape \(6,\)"),
        ("lstm", {**lstm, "proj": {"kernel": jnp.ones((5, 3))}}, r"^flax_params\['proj'\]\['kernel'\]: expected shape"),
        ("lstm", {**lstm, "hf": {"kernel": jnp.ones((6, 6)), "bias": jnp.ones(6)}},  # h is P = 3 wide
         r"^flax_params\['hf'\]\['kernel'\]: expected shape \(3, 6\)"),
    ]
    for cell, tree, message in cases:
        with pytest.raises(ValueError, match=message):
            flax_params.from_flax(cell, tree)

"""Optimisers: the same gradients give torch.optim's parameters step by step; module use; errors."""

import re

import numpy as np
import pytest

import fusedrnn
from fusedrnn import optim

SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
    dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1),
]
ADAM_CASES = [
    dict(lr=1e-2),
    dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05),
    dict(lr=1e-2, amsgrad=True),
]


def _against_torch(rng, ours_cls, torch_cls, kwargs, dtype=np.float64, steps=6):
    torch = pytest.importorskip("torch")
    shapes = [(4, 3), (5,), (2, 2, 2)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    ours, theirs = ours_cls(params, **kwargs), torch_cls(tparams, **kwargs)
    for _ in range(steps):
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        ours.step(grads)
        for tp, g in zip(tparams, grads):
            tp.grad = torch.from_numpy(g.copy())
        theirs.step()
    return params, [tp.detach().numpy() for tp in tparams]


@pytest.mark.parametrize("kwargs", SGD_CASES, ids=lambda k: ",".join(k))
def test_sgd_matches_torch(rng, kwargs):
    ours, theirs = _against_torch(rng, optim.SGD, pytest.importorskip("torch").optim.SGD, kwargs)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("kwargs", ADAM_CASES, ids=lambda k: ",".join(k))
def test_adam_matches_torch(rng, kwargs):
    ours, theirs = _against_torch(rng, optim.Adam, pytest.importorskip("torch").optim.Adam, kwargs)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_adam_float32_matches_torch(rng):
    ours, theirs = _against_torch(rng, optim.Adam, pytest.importorskip("torch").optim.Adam, dict(lr=1e-2),
                                  dtype=np.float32)
    for a, b in zip(ours, theirs):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_first_steps_by_hand():
    # SGD with momentum: b1 = g1, p -= lr*b1; b2 = m*b1 + g2. Adam's first step moves each entry by lr.
    p = np.array([1.0, -2.0])
    sgd = optim.SGD([p], lr=0.5, momentum=0.9)
    sgd.step([np.array([1.0, 2.0])])
    np.testing.assert_allclose(p, [0.5, -3.0])
    sgd.step([np.array([1.0, 0.0])])
    np.testing.assert_allclose(p, [0.5 - 0.5 * 1.9, -3.0 - 0.5 * 1.8])
    q = np.array([1.0, -2.0])
    optim.Adam({"q": q}, lr=0.1).step({"q": np.array([3.0, -1e-3])})
    np.testing.assert_allclose(q, [0.9, -1.9], rtol=1e-4)


def test_optimiser_drives_a_module_from_its_grads(rng):
    # An LSTM fitted to another one's outputs: Adam reading the module's grads lowers the loss.
    lstm = fusedrnn.LSTM(2, 3, dtype=np.float64, seed=0)
    x = rng.standard_normal((6, 4, 2))
    target, _ = fusedrnn.LSTM(2, 3, dtype=np.float64, seed=1).eval()(x)
    opt = optim.Adam(lstm, lr=0.05)
    first = None
    for _ in range(40):
        lstm.zero_grad()
        y, _ = lstm(x)
        loss, dy = fusedrnn.losses.mse_loss(y, target)
        first = loss if first is None else first
        lstm.backward(dy)
        opt.step()
    assert loss < 0.2 * first
    assert opt.steps == 40 and set(lstm.state_dict()) == {n for n, _ in lstm.named_parameters()}


def test_optimiser_errors():
    p = np.zeros(3)
    with pytest.raises(ValueError, match=r"lr: expected a value in \[0.0, inf\)"):
        optim.SGD([p], lr=-1)
    with pytest.raises(ValueError, match="nesterov: Nesterov momentum needs momentum > 0"):
        optim.SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"betas\[1\]: expected a value in \[0.0, 1.0\)"):
        optim.Adam([p], betas=(0.9, 1.0))
    with pytest.raises(TypeError, match=r"params\[0\]: expected a float array, got list \(NumPy or CUDA"):
        optim.SGD([[1.0, 2.0]], lr=0.1)
    with pytest.raises(ValueError, match="params: expected at least one parameter"):
        optim.SGD([], lr=0.1)
    frozen = np.zeros(2)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match=r"params\[0\]: the array is read-only"):
        optim.SGD([frozen], lr=0.1)
    opt = optim.SGD({"a": p}, lr=0.1)
    with pytest.raises(TypeError, match="grads: expected the gradients"):
        opt.step()
    with pytest.raises(ValueError, match=r"grads: no gradient for \['a'\]"):
        opt.step({"b": np.zeros(3)})
    with pytest.raises(ValueError, match=r"grads\['a'\]: expected shape \(3,\), got \(2,\)"):
        opt.step([np.zeros(2)])
    with pytest.raises(ValueError, match=r"grads: expected 1 gradients \(one per parameter\), got 2"):
        opt.step([np.zeros(3), np.zeros(3)])
    for missing in ([None], {"a": None}):
        with pytest.raises(TypeError, match=r"^grads\['a'\]: expected a gradient array, got None"):
            opt.step(missing)


@pytest.mark.filterwarnings("ignore:the matrix subclass is not the recommended way:PendingDeprecationWarning")
def test_array_subclasses_update_as_plain_arrays_and_shared_or_masked_elements_are_refused(rng):
    """np.matrix parameters (whose * is a matrix product, giving NaN in Adam's weight decay) and memmaps
    update as plain arrays do; a parameter whose elements share memory (every row would get the last
    row's update) and a masked array (its masked entries would be updated) are refused."""
    p, g = rng.standard_normal((2, 2)), rng.standard_normal((2, 2))
    for make in (optim.SGD, optim.Adam):
        kwargs = dict(lr=0.1, weight_decay=0.5)
        plain, matrix = p.copy(), np.asmatrix(p.copy())
        for target in (plain, matrix):
            opt = make([target], **kwargs)
            for _ in range(3):
                opt.step([g])
        assert type(matrix) is np.matrix
        np.testing.assert_array_equal(np.asarray(matrix), plain)
    as_strided = np.lib.stride_tricks.as_strided
    for shared in (as_strided(np.arange(3.0), (4, 3), (0, 8)),   # a row broadcast down, writable
                   as_strided(np.zeros(6), (4, 3), (8, 8))):      # rows one element apart
        with pytest.raises(ValueError, match=r"^params\[0\]: elements share memory"):
            optim.SGD([shared], lr=0.1)
    apart = np.zeros((4, 6))
    for view in (apart[:, ::2], apart[::-1, 1::2], apart.T, apart[:, :3]):
        optim.SGD([view], lr=0.1).step([np.ones(view.shape)])
    np.testing.assert_array_equal(apart[:, :3], np.full((4, 3), -0.1 - 0.1 - 0.1))  # each view once
    masked = np.ma.masked_array(np.zeros(3), mask=[False, True, False])
    with pytest.raises(TypeError, match=r"^params\[0\]: a masked array, whose mask would be ignored"):
        optim.SGD([masked], lr=0.1)


def test_bad_gradients_change_nothing():
    a, b = np.zeros(3), np.zeros(2)
    opt = optim.Adam([a, b], lr=0.1)
    for bad in (np.array(["x", "y"]), np.array([None, None]), np.array([1 + 5j, 2j]), np.array([1, 2])):
        with pytest.raises(TypeError, match=r"^grads\[1\]: expected a float array, got dtype"):
            opt.step([np.ones(3), bad])
    assert opt.steps == 0 and not a.any() and not b.any()


def test_module_gradients_are_matched_by_name_not_order(rng):
    lstm = fusedrnn.LSTM(4, 4, dtype=np.float64, seed=0)
    before = {k: v.copy() for k, v in lstm.named_parameters()}
    grads = {k: rng.standard_normal(v.shape) for k, v in lstm.named_parameters()}
    lstm.grads = dict(reversed(list(grads.items())))  # the same keys, another order (shapes alike at I == H)
    optim.SGD(lstm, lr=1.0).step()
    for k, v in lstm.named_parameters():
        np.testing.assert_array_equal(v, before[k] - grads[k])


def test_a_parameter_listed_twice_is_refused(rng, tmp_path):
    """Listed twice (the same array, views of one memory, a module twice), a parameter would take every
    step twice; disjoint views of one buffer are separate parameters."""
    p = rng.standard_normal((2, 3))
    m = fusedrnn.GRU(3, 4, seed=0)
    mapped = np.memmap(tmp_path / "p.dat", dtype=np.float64, mode="w+", shape=(4,))  # an ndarray subclass
    twice = (([p, p], ("1", "0")), ([p, p[:, 1:]], ("1", "0")), ([m, m], ("1.weight_ih_l0", "0.weight_ih_l0")),
             ([mapped[:2], mapped[:2]], ("1", "0")), ([mapped[:3], np.asarray(mapped)[2:]], ("1", "0")))
    for params, names in twice:
        for make in (optim.SGD, optim.Adam):
            with pytest.raises(ValueError, match=rf"^params\['?{re.escape(names[0])}'?\]: the same memory as "
                                                 rf"params\['?{re.escape(names[1])}'?\]"):
                make(params, lr=0.1)
    buffer = np.zeros(6)
    optim.SGD([buffer[:3], buffer[3:]], lr=0.1).step([np.ones(3), np.ones(3)])
    np.testing.assert_array_equal(buffer, np.full(6, -0.1))


# ---- state_dict: resuming -----------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda m: optim.Adam(m, lr=0.01, weight_decay=0.01, amsgrad=True),
    lambda m: optim.SGD(m, lr=0.1, momentum=0.9, nesterov=True),
], ids=["adam", "sgd"])
def test_a_restored_optimiser_resumes_bit_for_bit(rng, make):
    """Six steps straight, against three, a save (module and optimiser), a fresh module and optimiser
    (other hyperparameters) restored from it, and three more: the same parameters, bit for bit."""
    x = rng.standard_normal((5, 3, 4)).astype(np.float32)
    target = rng.standard_normal((5, 3, 6)).astype(np.float32)

    def train(module, opt, steps):
        for _ in range(steps):
            module.zero_grad()
            y, _ = module(x)
            module.backward(y - target)
            opt.step()

    straight = fusedrnn.GRU(4, 6, num_layers=2)
    start = straight.state_dict()
    opt = make(straight)
    train(straight, opt, 6)

    first = fusedrnn.GRU(4, 6, num_layers=2)
    first.load_state_dict(start)
    opt = make(first)
    train(first, opt, 3)
    saved_module, saved_opt = first.state_dict(), opt.state_dict()
    assert saved_opt["steps"] == 3 and set(saved_opt["state"]) == set(saved_module)

    resumed = fusedrnn.GRU(4, 6, num_layers=2)
    resumed.load_state_dict(saved_module)
    opt = make(resumed)
    hyperparameters = dict(saved_opt["hyperparameters"])
    opt.lr = 123.0  # restored from the state below
    opt.load_state_dict(saved_opt)
    assert opt.lr == hyperparameters["lr"] and opt.steps == 3
    train(resumed, opt, 3)
    for name, value in straight.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[name], value, err_msg=name)


def test_optimiser_state_dicts_are_copies_both_ways(rng):
    p = rng.standard_normal(4)
    opt = optim.Adam([p], lr=0.1)
    opt.step([np.ones(4)])
    saved = opt.state_dict()
    saved["state"][0]["exp_avg"][...] = 99.0  # the copy given out
    assert not np.any(opt.state[0]["exp_avg"] == 99.0)
    opt.load_state_dict(saved)
    saved["state"][0]["exp_avg"][...] = -1.0  # the mapping loaded from
    assert np.all(opt.state[0]["exp_avg"] == 99.0)


def test_optimiser_load_state_dict_refuses_by_name_and_changes_nothing(rng):
    torch = pytest.importorskip("torch")
    p = rng.standard_normal((2, 3))
    opt = optim.Adam({"w": p}, lr=0.1)
    opt.step({"w": np.ones((2, 3))})
    good = opt.state_dict()
    before = opt.state_dict()

    def changed(path, value):
        sd = {**good, "hyperparameters": dict(good["hyperparameters"]),
              "state": {"w": dict(good["state"]["w"])}}
        *outer, last = path
        target = sd
        for key in outer:
            target = target[key]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
        return sd

    cases = [
        ([], TypeError, r"^state_dict: expected a mapping \(an optimiser's state_dict\(\)\), got list"),
        (changed(["optimizer"], "SGD"), ValueError, r"^state_dict\['optimizer'\]: the state of a SGD, but this "
                                                    r"optimiser is a Adam"),
        (changed(["steps"], -1), ValueError, r"^state_dict\['steps'\]: expected a whole number >= 0"),
        (changed(["steps"], True), ValueError, r"^state_dict\['steps'\]"),
        (changed(["hyperparameters", "lr"], -1.0), ValueError, r"^lr: expected a value in"),
        (changed(["hyperparameters", "amsgrad"], "no"), TypeError, r"^amsgrad: expected a bool"),
        (changed(["hyperparameters", "momentum"], 0.9), ValueError,
         r"^state_dict\['hyperparameters'\]: missing keys \[\], unexpected keys \['momentum'\]"),
        (changed(["state", "v"], {}), ValueError,
         r"^state_dict\['state'\]: missing keys \[\], unexpected keys \['v'\]"),
        (changed(["state", "w", "momentum_buffer"], np.zeros((2, 3))), ValueError,
         r"^state_dict\['state'\]\['w'\]: unexpected keys \['momentum_buffer'\] \(this optimiser keeps"),
        (changed(["state", "w", "exp_avg"], np.zeros((3, 2))), ValueError,
         r"^state_dict\['state'\]\['w'\]\['exp_avg'\]: expected shape \(2, 3\), got \(3, 2\)"),
        (changed(["state", "w", "exp_avg_sq"], np.full((2, 3), np.nan)), ValueError,
         r"^state_dict\['state'\]\['w'\]\['exp_avg_sq'\]: contains NaN"),
        (changed(["state", "w", "exp_avg"], np.full((2, 3), "a")), TypeError, r"\['exp_avg'\]: expected a real"),
        (changed(["state", "w", "exp_avg_sq"], KeyError), ValueError,
         r"^state_dict\['state'\]\['w'\]: missing keys \['exp_avg_sq'\], which every parameter has after a step"),
    ]
    for sd, error, message in cases:
        with pytest.raises(error, match=message):
            opt.load_state_dict(sd)
        after = opt.state_dict()
        assert after["steps"] == before["steps"] and after["hyperparameters"] == before["hyperparameters"]
        np.testing.assert_array_equal(after["state"]["w"]["exp_avg"], before["state"]["w"]["exp_avg"])
    fresh = optim.Adam({"w": p}, lr=0.1).state_dict()  # no steps taken: no state needed
    assert fresh["state"] == {"w": {}}
    opt.load_state_dict(fresh)
    assert opt.steps == 0 and opt.state == [{}]
    # torch tensors and float32 arrays load, as float64
    opt.load_state_dict(changed(["state", "w", "exp_avg"], torch.ones((2, 3), dtype=torch.float32)))
    assert opt.state[0]["exp_avg"].dtype == np.float64 and np.all(opt.state[0]["exp_avg"] == 1.0)


def test_an_optimiser_of_its_own_needs_only_its_update(rng):
    """The base class, as its docstring offers it: a subclass with _update alone takes lr (positionally
    too) and saves and restores it."""
    class HalfStep(optim.Optimizer):
        def _update(self, p, g, state, xp):
            return p - 0.5 * self.lr * g

    p = np.ones(3)
    opt = HalfStep([p], 0.2)
    opt.step([np.ones(3)])
    np.testing.assert_allclose(p, 0.9)
    saved = opt.state_dict()
    assert saved["hyperparameters"] == {"lr": 0.2} and saved["steps"] == 1
    other = HalfStep([p], lr=1.0)
    other.load_state_dict(saved)
    assert other.lr == 0.2
    with pytest.raises(ValueError, match=r"^lr: expected a value in"):
        HalfStep([p], lr=-1.0)

    class CountedMomentum(optim.Optimizer):  # state it does not name: arrays and a count
        def _update(self, p, g, state, xp):
            state["count"] = state.get("count", 0) + 1
            state["velocity"] = 0.9 * state.get("velocity", 0.0) + g
            return p - self.lr * state["velocity"]

    params = [np.ones(3), np.ones(3)]
    opt = CountedMomentum([params[0]], 0.1)
    for _ in range(2):
        opt.step([np.arange(3.0)])
    saved = opt.state_dict()
    resumed = CountedMomentum([params[1]], 0.1)
    params[1][...] = params[0]
    resumed.load_state_dict(saved)
    assert resumed.state[0]["count"] == 2
    for o, p in ((opt, params[0]), (resumed, params[1])):
        o.step([np.arange(3.0)])
    np.testing.assert_array_equal(params[1], params[0])

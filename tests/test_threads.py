"""One process, several threads: explainers built and called at once must not break each other
or the models (torch.fx patches nn.Module for the whole process while it traces; a model in
training mode is switched to eval mode per call; PyTorch's TF32 flags are process-wide)."""
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rsp_fast
from rsp_fast import api, tf32

torchvision = pytest.importorskip("torchvision")


def run_in_threads(*works, timeout=120):
    """Runs each work in its own thread; returns their results, re-raising the first error."""
    results, errors = [None] * len(works), []

    def run(i, work):
        try:
            results[i] = work()
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, w)) for i, w in enumerate(works)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


class SizeBranchingNet(nn.Module):
    """A forward that branches on a size: traced again for each input shape, at its first call."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1), nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.c1(x))
        if x.shape[-1] > 24:
            x = F.max_pool2d(x, 2)
        return self.fc(F.relu(self.c2(x)).mean((2, 3)))


def test_explainers_built_in_two_threads_leave_every_model_working():
    torch.manual_seed(0)
    models = [torchvision.models.resnet18().eval(), torchvision.models.mobilenet_v2().eval()]
    run_in_threads(*[lambda m=m: [rsp_fast.RSP(m) for _ in range(4)] for m in models])
    x = torch.randn(1, 3, 64, 64)
    assert isinstance(models[0](x), torch.Tensor)  # not an fx Proxy: nn.Module.__call__ is PyTorch's again
    assert isinstance(torchvision.models.vgg11()(x), torch.Tensor)
    assert torch.isfinite(rsp_fast.RSP(models[1]).attribute(x)).all()


def test_shapes_traced_in_two_threads_at_once_match_one_thread():
    torch.manual_seed(0)
    model = SizeBranchingNet().eval()
    shapes = [[(1, 3, 16 + 4 * i + 2 * k, 20 + 4 * i) for i in range(5)] for k in (0, 1)]
    inputs = [[torch.randn(s) for s in row] for row in shapes]
    expected = [[rsp_fast.RSP(model).attribute(x) for x in row] for row in inputs]
    shared = rsp_fast.RSP(model)  # no plan for any of these shapes yet: each thread traces its own
    got = run_in_threads(*[lambda row=row: [shared.attribute(x) for x in row] for row in inputs])
    for row_got, row_expected in zip(got, expected):
        for a, b in zip(row_got, row_expected):
            assert torch.equal(a, b)
    assert isinstance(model(torch.randn(1, 3, 50, 50)), torch.Tensor)


def test_calls_while_another_thread_builds_an_explainer_for_the_same_model():
    """fx patches module attribute reads process-wide while it traces: a call whose rules read a
    weight meanwhile got an fx Proxy (a raw TraceError in about half the calls) and fx stored that
    thread's tensors on the model as _tensor_constantN. The whole pass now waits for the trace."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).double().eval()
    explainer, x = rsp_fast.RSP(model), torch.randn(2, 3, 24, 24, dtype=torch.float64)
    expected, attributes = explainer.attribute(x), set(model.__dict__)
    deadline = time.monotonic() + 4

    def build():
        while time.monotonic() < deadline:
            rsp_fast.RSP(model)

    def explain():
        calls = 0
        while time.monotonic() < deadline:
            assert torch.equal(explainer.attribute(x), expected)
            calls += 1
        return calls

    assert run_in_threads(build, explain)[1] > 0
    assert set(model.__dict__) == attributes


def test_two_threads_that_both_trace_a_new_shape_do_not_wait_for_each_other(monkeypatch):
    """A trace waits for other threads' passes; when the plan was got inside the pass, two threads
    that each met a new shape waited for each other forever (the meeting forced here)."""
    torch.manual_seed(0)
    model, meet = SizeBranchingNet().eval(), threading.Barrier(2, timeout=5)
    plan_for = api.RSP._current_plan

    def both_at_once(self, inputs):
        try:
            meet.wait()
        except threading.BrokenBarrierError:
            pass
        return plan_for(self, inputs)
    monkeypatch.setattr(api.RSP, "_current_plan", both_at_once)
    explainer = rsp_fast.RSP(model)
    rows = [[torch.randn(1, 3, 16 + i + 40 * k, 16 + i) for i in range(3)] for k in (0, 1)]
    got = run_in_threads(*[lambda row=row: [explainer.attribute(x) for x in row] for row in rows], timeout=60)
    assert [len(g) for g in got] == [3, 3]


def test_calls_on_a_training_model_from_two_threads_explain_it_in_eval_mode_and_restore_it():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().train()
    model.layer1[0].bn1.eval()  # a module in a mode of its own, which must come back too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    explainer = rsp_fast.RSP(model, backend="torch")
    small, big = torch.randn(1, 3, 32, 32), torch.randn(3, 3, 128, 128)
    expected_small, expected_big = explainer.attribute(small), explainer.attribute(big)

    def calls(x, pause):
        out = []
        for _ in range(4):
            time.sleep(pause)  # the short calls end while a long one is still in its forward pass
            out.append(explainer.attribute(x))
        return out

    smalls, bigs = run_in_threads(lambda: calls(small, 0.0), lambda: calls(big, 0.002))
    assert all(torch.equal(r, expected_small) for r in smalls)
    assert all(torch.equal(r, expected_big) for r in bigs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # running statistics untouched
    assert model.training and not model.layer1[0].bn1.training and model.layer1[0].bn2.training


def test_tf32_flags_are_shared_by_calls_that_want_them_and_restored_after_the_last():
    cuda = torch.device("cuda")  # only the process-wide flags are touched: no GPU needed
    flags = lambda: (tf32.matmul_tf32(), tf32.conv_tf32())  # noqa: E731
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # the user's settings
    try:
        fp32_in, release, seen = threading.Event(), threading.Event(), {}

        def fp32_call(name):
            with api._matmul_precision("fp32", cuda):
                seen[name] = flags()
                fp32_in.set()
                release.wait(30)
                seen[name + " at the end"] = flags()

        def tf32_call():
            fp32_in.wait(30)
            start = time.monotonic()
            with api._matmul_precision("tf32", cuda):
                seen["tf32"] = flags()
                seen["tf32 waited"] = time.monotonic() - start

        def releaser():
            fp32_in.wait(30)
            time.sleep(0.3)  # both fp32 calls run; the tf32 one must wait for them
            release.set()

        run_in_threads(lambda: fp32_call("a"), lambda: fp32_call("b"), tf32_call, releaser)
        assert seen["a"] == seen["b"] == seen["a at the end"] == seen["b at the end"] == (False, False)
        assert seen["tf32"] == (True, True) and seen["tf32 waited"] > 0.2
        assert flags() == (False, True)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, True)  # readable as set
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.skipif(not tf32.STRINGS, reason="torch before 2.9 has only the allow_tf32 flags")
@pytest.mark.parametrize("setting", ["torch.backends.cuda.matmul.fp32_precision", "torch.backends.fp32_precision"])
def test_tf32_set_through_torchs_new_settings(setting):
    """torch ≥ 2.9's fp32_precision = "tf32" (what its docs recommend) made the legacy
    allow_tf32 flags, which rsp_fast read, raise: every float32 explanation failed, on the CPU
    too. The settings are read from the strings now, and put back as they were."""
    strings = lambda: (torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision,  # noqa: E731
                       torch.backends.cudnn.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    saved = strings()
    owner, name = setting.removeprefix("torch.backends.").rpartition(".")[::2]
    target = torch.backends
    for part in filter(None, owner.split(".")):
        target = getattr(target, part)
    try:
        setattr(target, name, "tf32")
        user = strings()
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
        assert rsp_fast.RSP(model).attribute(torch.rand(1, 3, 8, 8)).shape == (1, 3, 8, 8)
        if "matmul" in setting:  # the global one yields to a leaf set before (allow_tf32 = False sets "ieee")
            assert tf32.matmul_tf32()
        with api._matmul_precision("fp32", torch.device("cuda")):  # flags only: no GPU needed
            assert not tf32.matmul_tf32() and not tf32.conv_tf32()
        assert strings() == user
    finally:
        torch.backends.fp32_precision = saved[0]
        (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.fp32_precision,
         torch.backends.cudnn.conv.fp32_precision) = saved[1:]

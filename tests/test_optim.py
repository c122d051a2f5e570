import copy
import io
import math
import shutil
import weakref

import pytest
import torch
from torch import nn

from engine import optim
from engine.lora import inject_lora, mark_only_lora_trainable
from engine.grad_clip import clip_coefficient
from engine.optim import AdamW, param_groups_for_weight_decay, split_decay_names
from engine.schedule import lr_at, set_lr

SHAPES = [(6, 5), (5,), (4, 3, 2), (7,), (3, 3)]
# per-group hyper-parameters: weight decay on and off, different lr/betas/eps
GROUP_OPTIONS = [
    dict(lr=3e-3, weight_decay=0.1),
    dict(lr=1e-2, weight_decay=0.0, betas=(0.8, 0.99)),
    dict(lr=5e-4, weight_decay=0.01, eps=1e-6),
]


def make_params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]


def make_groups(params: list[torch.Tensor]) -> list[dict]:
    return [
        {"params": params[0:2], **GROUP_OPTIONS[0]},
        {"params": params[2:4], **GROUP_OPTIONS[1]},
        {"params": params[4:], **GROUP_OPTIONS[2]},
    ]


def fill_grads(params: list[torch.Tensor], step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        grad = (torch.randn(p.shape, generator=g) * (1 + i)).to(p.dtype)
        # every 7th step one parameter gets no gradient: the optimizer must skip it
        p.grad = None if (step % 7 == 3 and i == 1) else grad


def run_steps(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: range) -> None:
    for step in steps:
        fill_grads(params, step)
        for group in optimizer.param_groups:  # a scheduler writing lr between steps
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * (1.0 - step / 200)
        optimizer.step()


def via_gpu_path(params, grads, exp_avgs, exp_avg_sqs, steps, hyper, scratch, clip_coef=None):
    """`_adamw_update_cpu`'s stand-in that runs the GPU path's foreach ops instead."""
    optim._adamw_update(params, grads, exp_avgs, exp_avg_sqs, steps, hyper, clip_coef)


@pytest.mark.parametrize("cpu_chunk_numel", [1 << 16, 8])  # one chunk; several CPU chunks
def test_adamw_matches_torch_adamw_for_100_steps(monkeypatch, cpu_chunk_numel):
    monkeypatch.setattr(optim, "CPU_CHUNK_NUMEL", cpu_chunk_numel)
    ours_params, torch_params = make_params(), make_params()
    ours = AdamW(make_groups(ours_params))
    reference = torch.optim.AdamW(make_groups(torch_params), foreach=True)
    run_steps(ours, ours_params, range(100))
    run_steps(reference, torch_params, range(100))
    for a, b in zip(ours_params, torch_params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.equal(ours_params[0], make_params()[0])  # it did move


@pytest.mark.parametrize("gpu_chunk_numel", [1 << 25, 7])  # one run per group; many runs and slices
def test_gpu_foreach_update_matches_torch_adamw_when_run_on_cpu_tensors(monkeypatch, gpu_chunk_numel):
    # The GPU path (foreach ops over runs of tensors) never runs on a CPU machine otherwise: route
    # CPU tensors through it so it is checked here too.
    monkeypatch.setattr(optim, "GPU_CHUNK_NUMEL", gpu_chunk_numel)
    monkeypatch.setattr(optim, "_adamw_update_cpu", via_gpu_path)
    ours_params, torch_params = make_params(), make_params()
    ours = AdamW(make_groups(ours_params), compile=False)
    reference = torch.optim.AdamW(make_groups(torch_params), foreach=True)
    run_steps(ours, ours_params, range(100))
    run_steps(reference, torch_params, range(100))
    for a, b in zip(ours_params, torch_params):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_gpu_update_in_bounded_runs_is_bit_identical_to_one_run_and_counts_each_step_once(monkeypatch):
    def after_steps(limit: int) -> list[torch.Tensor]:
        monkeypatch.setattr(optim, "GPU_CHUNK_NUMEL", limit)
        monkeypatch.setattr(optim, "_adamw_update_cpu", via_gpu_path)
        params = make_params()
        opt = AdamW(make_groups(params), compile=False)
        run_steps(opt, params, range(20))
        # parameter 1 has no gradient in 3 of the 20 steps (fill_grads); sliced ones still count one per step
        assert [float(opt.state[p]["step"]) for p in params] == [17.0 if i == 1 else 20.0 for i in range(len(params))]
        return params

    whole, sliced = after_steps(1 << 25), after_steps(5)
    assert all(torch.equal(a, b) for a, b in zip(whole, sliced))


def test_gpu_runs_hold_at_most_the_limit_and_cover_every_element():
    tensors = [torch.randn(3, 4), torch.randn(10), torch.randn(2, 3).t(), torch.randn(1)]
    grads = [t.clone() for t in tensors]
    runs = list(optim._runs(tensors, grads, grads, grads, [1.0, 2.0, 3.0, 4.0], limit=5))
    for params, *_ in runs:
        assert sum(p.numel() for p in params) <= 5 or len(params) == 1  # a strided tensor goes whole
    assert sum(p.numel() for params, *_ in runs for p in params) == sum(t.numel() for t in tensors)
    assert [t for *_, times in runs for t in times][-1] == 4.0


def test_adamw_matches_torch_adamw_in_bfloat16():
    ours_params = [p.detach().bfloat16().requires_grad_() for p in make_params()]
    torch_params = [p.detach().clone().requires_grad_() for p in ours_params]
    ours = AdamW(make_groups(ours_params))
    reference = torch.optim.AdamW(make_groups(torch_params), foreach=True)
    run_steps(ours, ours_params, range(20))
    run_steps(reference, torch_params, range(20))
    for a, b in zip(ours_params, torch_params):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_adamw_state_dict_round_trip_mid_way_continues_identically():
    straight_params = make_params()
    straight = AdamW(make_groups(straight_params))
    run_steps(straight, straight_params, range(100))

    first_params = make_params()
    first = AdamW(make_groups(first_params))
    run_steps(first, first_params, range(50))
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first_params], "optim": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    resumed_params = [p.clone().requires_grad_() for p in saved["params"]]
    resumed = AdamW(make_groups(resumed_params))
    resumed.load_state_dict(saved["optim"])
    assert resumed.state[resumed_params[0]]["step"].item() == 50
    run_steps(resumed, resumed_params, range(50, 100))
    for a, b in zip(resumed_params, straight_params):
        assert torch.equal(a, b)


def test_adamw_state_dict_is_interchangeable_with_torch_adamw():
    torch_params = make_params()
    reference = torch.optim.AdamW(make_groups(torch_params), foreach=True)
    run_steps(reference, torch_params, range(30))

    ours_params = [p.detach().clone().requires_grad_() for p in torch_params]
    ours = AdamW(make_groups(ours_params))
    ours.load_state_dict(copy.deepcopy(reference.state_dict()))
    run_steps(ours, ours_params, range(30, 60))
    run_steps(reference, torch_params, range(30, 60))
    for a, b in zip(ours_params, torch_params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert set(ours.state[ours_params[0]]) == {"step", "exp_avg", "exp_avg_sq"}


def test_adamw_skips_parameters_without_grad():
    used, unused = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    optimizer = AdamW([used, unused], lr=0.1, weight_decay=0.5)
    used.grad = torch.ones(3)
    optimizer.step()
    assert torch.equal(unused, torch.ones(3))  # not even decayed
    assert len(optimizer.state[unused]) == 0
    assert not torch.equal(used, torch.ones(3))


def test_adamw_first_step_moves_each_weight_by_lr_after_decay():
    # with bias correction, Adam's first update is lr * g / (|g| + eps') = lr * sign(g)
    w = torch.full((4,), 2.0, requires_grad=True)
    optimizer = AdamW([w], lr=0.1, weight_decay=0.5, eps=0.0)
    w.grad = torch.tensor([1.0, -2.0, 3.0, -4.0])
    optimizer.step()
    expected = 2.0 * (1 - 0.1 * 0.5) - 0.1 * torch.tensor([1.0, -1.0, 1.0, -1.0])
    torch.testing.assert_close(w.detach(), expected)


def test_adamw_rejects_bad_hyper_parameters():
    p = [torch.zeros(1, requires_grad=True)]
    with pytest.raises(ValueError, match="betas"):
        AdamW(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        AdamW(p, lr=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        AdamW(p, weight_decay=-0.1)


class TinyAttention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))


class TinyLayer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.self_attn = TinyAttention(d)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.final_layer_norm = nn.LayerNorm(d)


class LearnedPositions(nn.Module):
    """Not an nn.Embedding: only its name says it is one."""

    def __init__(self, n: int, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, d))


class TinyEncoder(nn.Module):
    def __init__(self, shared: nn.Embedding, d: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(shared.num_embeddings, d)
        self.embed_tokens.weight = shared.weight  # tied, as in BART
        self.embed_positions = LearnedPositions(10, d)
        self.layernorm_embedding = nn.LayerNorm(d)
        self.layers = nn.ModuleList([TinyLayer(d) for _ in range(2)])


class TinyBart(nn.Module):
    def __init__(self, d: int = 8, vocab: int = 20):
        super().__init__()
        self.model = nn.Module()
        self.model.shared = nn.Embedding(vocab, d)
        self.model.encoder = TinyEncoder(self.model.shared, d)
        # lm_head before nothing else would decide: a tied tensor is not decayed if any name says no
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.model.shared.weight


def test_weight_decay_groups_follow_bart_names():
    model = TinyBart()
    model.model.encoder.layers[1].fc2.weight.requires_grad_(False)  # frozen: in no group
    decay, no_decay = split_decay_names(model)
    layer0 = "model.encoder.layers.0"
    assert f"{layer0}.self_attn.q_proj.weight" in decay
    assert f"{layer0}.fc1.weight" in decay
    assert f"{layer0}.self_attn.q_proj.bias" in no_decay
    assert f"{layer0}.self_attn_layer_norm.weight" in no_decay
    assert f"{layer0}.final_layer_norm.bias" in no_decay
    assert "model.encoder.layernorm_embedding.weight" in no_decay
    assert "model.encoder.embed_positions.weight" in no_decay
    assert "model.shared.weight" in no_decay
    assert all(n.endswith(".weight") and ("proj" in n or ".fc" in n) for n in decay)
    assert "model.encoder.layers.1.fc2.weight" not in decay + no_decay
    assert "lm_head.weight" not in decay  # the tied embedding, listed once under its first name
    assert len(decay) == 2 * 4 + 2 + 1  # 8 attention projections, fc1 x2, fc2 of layer 0

    groups = param_groups_for_weight_decay(model, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    grouped = [p for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]  # deduplicated by torch
    assert len(grouped) == len({id(p) for p in grouped}) == len(trainable)
    assert {id(p) for p in grouped} == {id(p) for p in trainable}
    AdamW(groups)  # torch accepts the groups (no duplicates, no empty lists)


def test_weight_decay_groups_decay_lora_matrices_only():
    model = TinyBart()
    inject_lora(model, "q_proj,v_proj", rank=2, alpha=4)
    mark_only_lora_trainable(model, train_biases=True)
    decay, no_decay = split_decay_names(model)
    assert decay and all(n.endswith((".lora_a", ".lora_b")) for n in decay)
    assert len(decay) == 2 * 2 * 2  # 2 layers x (q, v) x (a, b)
    assert no_decay and all(n.endswith(".bias") for n in no_decay)


def test_weight_decay_groups_need_a_trainable_parameter():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        param_groups_for_weight_decay(model, 0.1)


@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (10, 10), (5, 37), (0, 1), (1, 1), (12, 10)])
@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_lr_at_matches_transformers_schedules(kind, warmup, total):
    transformers = pytest.importorskip("transformers")
    factory = {
        "linear": transformers.get_linear_schedule_with_warmup,
        "cosine": transformers.get_cosine_schedule_with_warmup,
        "constant": lambda opt, w, t: transformers.get_constant_schedule_with_warmup(opt, w),
    }[kind]
    base_lr = 5e-5
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    scheduler = factory(optimizer, warmup, total)
    for step in range(total):
        assert lr_at(step, base_lr, warmup, total, kind) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12, abs=1e-20)
        optimizer.step()
        scheduler.step()


def test_lr_at_shape_of_warmup_and_decay():
    assert lr_at(0, 1.0, 0, 10, "linear") == 1.0  # no warm-up: the first update uses the full rate
    assert lr_at(0, 1.0, 4, 10, "linear") == 0.0
    assert lr_at(2, 1.0, 4, 10, "cosine") == 0.5
    assert lr_at(4, 1.0, 4, 10, "cosine") == 1.0
    assert lr_at(7, 1.0, 4, 10, "cosine") == pytest.approx(0.5)
    assert lr_at(7, 1.0, 4, 10, "linear") == pytest.approx(0.5)
    for kind in ("linear", "cosine"):
        assert lr_at(10, 1.0, 4, 10, kind) == 0.0
        assert lr_at(15, 1.0, 4, 10, kind) == 0.0  # HF's cosine would climb back up here
    assert lr_at(15, 1.0, 4, 10, "constant") == 1.0
    with pytest.raises(ValueError, match="kind"):
        lr_at(0, 1.0, 0, 10, "step")


def test_set_lr_uses_each_group_base_rate_and_survives_resume():
    params = [torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)]
    optimizer = AdamW([{"params": [params[0]], "lr": 1e-3}, {"params": [params[1]], "lr": 1e-4}])
    assert set_lr(optimizer, 0, 2, 10) == [0.0, 0.0]
    assert set_lr(optimizer, 1, 2, 10) == [pytest.approx(5e-4), pytest.approx(5e-5)]

    resumed = AdamW([{"params": [params[0]], "lr": 123.0}, {"params": [params[1]], "lr": 456.0}])
    resumed.load_state_dict(optimizer.state_dict())
    rates = set_lr(resumed, 6, 2, 10, "cosine")
    expected = [base * 0.5 * (1 + math.cos(math.pi * 0.5)) for base in (1e-3, 1e-4)]
    assert rates == pytest.approx(expected)
    assert [g["lr"] for g in resumed.param_groups] == rates


def test_compiled_cpu_update_matches_torch_adamw_for_100_steps():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("torch.compile on the CPU needs a C++ compiler (c++ / g++), none found")
    ours_params, torch_params = make_params(), make_params()
    ours = AdamW(make_groups(ours_params), compile=True)
    reference = torch.optim.AdamW(make_groups(torch_params), foreach=True)
    run_steps(ours, ours_params, range(100))
    assert not ours._compile_failed  # a fallback to the eager update would prove nothing
    run_steps(reference, torch_params, range(100))
    for a, b in zip(ours_params, torch_params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(ours_params, torch_params):
        assert ours.state[a]["step"].item() == reference.state[b]["step"].item()


def test_compiled_cpu_update_is_one_parallel_loop_over_a_symbolic_size():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("torch.compile on the CPU needs a C++ compiler (c++ / g++), none found")
    from torch._inductor.utils import run_and_get_code

    compiled = torch.compile(optim._fused_adamw_pass, dynamic=True, fullgraph=True, options=optim.COMPILE_OPTIONS)
    p, g, m, v = (torch.rand(3000) for _ in range(4))
    hyper = torch.tensor([0.99, 0.1, 0.999, 0.001, 0.5, 1e-8, -1e-3, 0.25])
    _, sources = run_and_get_code(compiled, p, g, m, v, hyper)
    kernel = "\n".join(sources)
    # without the option inductor emits a serial loop for a symbolic size: one core of the machine
    assert "#pragma omp parallel" in kernel
    assert kernel.count("extern \"C\"") == 1  # the whole update is one fused kernel


def test_failed_compile_warns_and_falls_back_to_the_exact_eager_update(monkeypatch):
    def broken():
        def fail(*args):
            raise RuntimeError("no compiler")
        return fail

    monkeypatch.setattr(optim, "_compiled_adamw", broken)
    ours_params, torch_params = make_params(), make_params()
    ours = AdamW(make_groups(ours_params), compile=True)
    reference = torch.optim.AdamW(make_groups(torch_params), foreach=True)
    with pytest.warns(UserWarning, match="no compiler"):
        run_steps(ours, ours_params, range(1))
    run_steps(ours, ours_params, range(1, 10))
    run_steps(reference, torch_params, range(10))
    for a, b in zip(ours_params, torch_params):
        assert torch.equal(a, b)


def test_compiled_update_is_chosen_for_big_fp32_groups_only(monkeypatch):
    monkeypatch.setattr(optim, "COMPILE_MIN_NUMEL", 40)
    params = make_params()  # 30 + 5 + 24 + 7 + 9 elements
    auto = AdamW(make_groups(params))
    assert auto._use_compiled(torch.float32, params[0:2]) is False  # 35 elements
    assert auto._use_compiled(torch.float32, params[2:5]) is True  # 40 elements
    assert auto._use_compiled(torch.bfloat16, params) is False
    assert AdamW(make_groups(params), compile=False)._use_compiled(torch.float32, params) is False
    assert AdamW(make_groups(params), compile=True)._use_compiled(torch.float32, params[1:2]) is True


def has_cpp_compiler() -> bool:
    return shutil.which("c++") is not None or shutil.which("g++") is not None


@pytest.mark.parametrize("path", ["cpu", "cpu slices", "cpu bf16", "gpu foreach", "compiled"])
def test_a_clip_coefficient_given_to_the_step_equals_clipping_the_gradients_first(monkeypatch, path):
    if path == "compiled" and not has_cpp_compiler():
        pytest.skip("torch.compile on the CPU needs a C++ compiler (c++ / g++), none found")
    if path == "cpu slices":
        monkeypatch.setattr(optim, "CPU_CHUNK_NUMEL", 8)
    if path == "gpu foreach":
        monkeypatch.setattr(optim, "GPU_CHUNK_NUMEL", 7)
        monkeypatch.setattr(optim, "_adamw_update_cpu", via_gpu_path)
    dtype = torch.bfloat16 if path == "cpu bf16" else torch.float32
    folded_params = [p.detach().to(dtype).requires_grad_() for p in make_params()]
    clipped_params = [p.detach().clone().requires_grad_() for p in folded_params]
    folded = AdamW(make_groups(folded_params), compile=path == "compiled")
    clipped = AdamW(make_groups(clipped_params), compile=path == "compiled")
    coefficients = []
    for step in range(30):
        max_norm = 2.0 if step % 3 else 100.0  # mostly clipped; every third step not (coefficient 1)
        fill_grads(folded_params, step)
        fill_grads(clipped_params, step)
        grads_before = [None if p.grad is None else p.grad.clone() for p in folded_params]
        norm, coefficient = clip_coefficient(folded_params, max_norm)
        folded.step(clip_coef=coefficient)
        assert all(a is None and b.grad is None or torch.equal(a, b.grad)
                   for a, b in zip(grads_before, folded_params))  # read, not written
        assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(clipped_params, max_norm))
        clipped.step()
        coefficients.append(float(coefficient))
    assert folded._compile_failed is False
    for a, b in zip(folded_params, clipped_params):
        assert a.dtype == dtype and torch.equal(a, b)
    assert min(coefficients) < 0.5 and max(coefficients) == 1.0  # both kinds of step were taken


@pytest.mark.parametrize("path", ["cpu", "gpu foreach", "compiled"])
def test_released_grads_are_freed_one_by_one_before_later_moments_are_made_with_the_same_update(monkeypatch, path):
    if path == "compiled" and not has_cpp_compiler():
        pytest.skip("torch.compile on the CPU needs a C++ compiler (c++ / g++), none found")
    if path == "gpu foreach":
        monkeypatch.setattr(optim, "_adamw_update_cpu", via_gpu_path)
    released_params, kept_params = make_params(), make_params()
    released = AdamW(make_groups(released_params), compile=path == "compiled")
    kept = AdamW(make_groups(kept_params), compile=path == "compiled")
    zeros_like = torch.zeros_like
    for step in range(12):
        fill_grads(released_params, step)
        fill_grads(kept_params, step)
        grads = {id(p): weakref.ref(p.grad) for p in released_params if p.grad is not None}
        updated = set()

        def moments_made(p, **kwargs):  # each parameter's moments: the grads updated before it are gone
            assert all(grads[key]() is None for key in updated - {id(p)})
            updated.add(id(p))
            return zeros_like(p, **kwargs)

        monkeypatch.setattr(torch, "zeros_like", moments_made)
        released.step(clip_coef=torch.tensor(0.5), release_grads=True)
        monkeypatch.setattr(torch, "zeros_like", zeros_like)
        kept.step(clip_coef=torch.tensor(0.5))
        assert all(p.grad is None for p in released_params)
        assert all(ref() is None for ref in grads.values())
        assert (len(updated) == len(grads)) == (step == 0)  # moments are made on the first step only
        assert all(p.grad is not None for p in kept_params if step % 7 != 3) and not released._compile_failed
    for a, b in zip(released_params, kept_params):
        assert torch.equal(a, b)
        assert torch.equal(released.state[a]["exp_avg_sq"], kept.state[b]["exp_avg_sq"])


def test_only_a_step_that_makes_moments_goes_one_parameter_at_a_time(monkeypatch):
    calls = []
    update = optim._adamw_update
    monkeypatch.setattr(optim, "_adamw_update", lambda params, *rest: calls.append(len(params)) or update(params, *rest))
    monkeypatch.setattr(optim, "_adamw_update_cpu", via_gpu_path)
    params = make_params()
    opt = AdamW(make_groups(params), compile=False)
    for step in range(2):
        fill_grads(params, step)
        calls.clear()
        opt.step(release_grads=True)
        assert calls == ([1] * len(params) if step == 0 else [2, 2, 1])  # then whole groups, as foreach wants
        assert all(p.grad is None for p in params)


def test_grad_scaler_hands_the_clip_coefficient_and_release_to_adamw():
    # the fp16 path of the training loop: unscale, clip's coefficient, scaler.step(optimizer, ...)
    scaled_params, plain_params = make_params(), make_params()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaled, plain = AdamW(make_groups(scaled_params), compile=False), AdamW(make_groups(plain_params), compile=False)
    for step in range(3):
        fill_grads(plain_params, step)
        fill_grads(scaled_params, step)
        scaler.scale(torch.ones(()))  # the loss the scaler would scale
        for p in scaled_params:
            if p.grad is not None:
                p.grad.mul_(1024.0)  # as backward of a scaled loss leaves them
        scaler.unscale_(scaled)
        scaler.step(scaled, clip_coef=clip_coefficient(scaled_params, 2.0)[1], release_grads=True)
        scaler.update()
        plain.step(clip_coef=clip_coefficient(plain_params, 2.0)[1])
        assert all(p.grad is None for p in scaled_params)
    for a, b in zip(scaled_params, plain_params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # 1024 is a power of two: unscaling is exact

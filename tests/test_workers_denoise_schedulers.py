"""Batched per-request schedules against diffusers' own scheduler run alone, request by request.

The fake denoiser uses only +, -, *, / (correctly rounded, so the same in a batch as alone),
unlike sin or exp whose vectorised and scalar CPU paths may differ in the last bit.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from zomni.workers.denoise_schedulers import (
    BatchedDDIM,
    BatchedFlowMatchEuler,
    load_scheduler,
    scheduler_from_config,
)

SHAPE = (4, 8, 8)  # one latent; 256 elements
IMAGE_SEQ_LEN = 1024  # for dynamic shifting: a 512 px SD3 image has (64 // 2) ** 2 tokens

# (num_steps, engine step at which the request joins)
REQUESTS = [(3, 0), (5, 2), (28, 1), (50, 4)]

SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
DYNAMIC = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
           "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
           "base_image_seq_len": 256, "max_image_seq_len": 4096}
# facebook/DiT-XL-2-256's scheduler/scheduler_config.json.
DIT = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.12.0.dev0", "beta_end": 0.02,
       "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": False,
       "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": True,
       "steps_offset": 0, "trained_betas": None}

CONFIGS = {
    "flow_shift3": SD3,
    "flow_dynamic": DYNAMIC,
    "flow_dynamic_linear_terminal": {**DYNAMIC, "time_shift_type": "linear",
                                     "shift_terminal": 0.1},
    "flow_karras": {**SD3, "use_karras_sigmas": True},
    "flow_exponential": {**SD3, "use_exponential_sigmas": True},
    "ddim_dit": DIT,
    "ddim_dit_clip": {**DIT, "clip_sample": True, "clip_sample_range": 0.5},
    "ddim_v_trailing_zero_snr": {**DIT, "prediction_type": "v_prediction",
                                 "timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
    "ddim_sample_offset": {**DIT, "prediction_type": "sample", "beta_schedule": "scaled_linear",
                           "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
                           "set_alpha_to_one": False, "clip_sample": True},
    "ddim_linspace_cosine": {**DIT, "timestep_spacing": "linspace",
                             "beta_schedule": "squaredcos_cap_v2"},
}


def fake_model(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Deterministic, nonlinear in the sample, and dependent on the timestep value."""
    tau = t / 1000  # int64 DDIM timesteps become float32 here, as in an embedding
    return sample / (1 + sample * sample) + 0.5 * tau * sample - 0.25 * tau


def initial_noise(request: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(request))


def diffusers_scheduler(config: dict, num_steps: int):
    """diffusers' own scheduler for `config`, its timesteps set for `num_steps`."""
    cls = {"FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler,
           "DDIMScheduler": DDIMScheduler}[config["_class_name"]]
    scheduler = cls.from_config(config)
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting"):
        c = scheduler.config
        m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        kwargs["mu"] = IMAGE_SEQ_LEN * m + c.base_shift - m * c.base_image_seq_len
    scheduler.set_timesteps(num_steps, **kwargs)
    return scheduler


def reference(config: dict, num_steps: int, noise: torch.Tensor) -> torch.Tensor:
    """The request alone through diffusers' scheduler, as its pipeline's loop runs it."""
    scheduler = diffusers_scheduler(config, num_steps)
    x = noise[None]
    for t in scheduler.timesteps:
        x = scheduler.step(fake_model(x, t), t, x).prev_sample
    return x[0]


def run_batched(config: dict) -> list[torch.Tensor]:
    """Continuous batching: requests join at their engine step, leave after their last step."""
    scheduler = scheduler_from_config(config)
    schedules = [scheduler.schedule(n, IMAGE_SEQ_LEN) for n, _ in REQUESTS]
    samples = [initial_noise(r) for r in range(len(REQUESTS))]
    done = [0] * len(REQUESTS)  # num_completed_steps
    engine_step = 0
    while any(d < s.num_steps for d, s in zip(done, schedules)):
        rows = [r for r, (_, join) in enumerate(REQUESTS)
                if join <= engine_step and done[r] < schedules[r].num_steps]
        batch_schedules = [schedules[r] for r in rows]
        indices = [done[r] for r in rows]
        x = torch.stack([samples[r] for r in rows])
        t = scheduler.timesteps(batch_schedules, indices)
        out = fake_model(x, t.view(-1, 1, 1, 1))
        x = scheduler.step(x, out, batch_schedules, indices)
        for b, r in enumerate(rows):
            samples[r] = x[b]
            done[r] += 1
        engine_step += 1
    return samples


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_equals_diffusers_alone(name: str) -> None:
    config = CONFIGS[name]
    samples = run_batched(config)
    for r, (num_steps, _) in enumerate(REQUESTS):
        expected = reference(config, num_steps, initial_noise(r))
        # float32 on the CPU: the same ops on the same values, so bit-exact.
        assert torch.equal(samples[r], expected), (name, num_steps)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_predict_x0_is_the_denoised_estimate(name: str) -> None:
    """Rows at different steps of different schedules. DDIM: diffusers' own
    `pred_original_sample`. Flow matching (diffusers returns no x0): solved from diffusers'
    step, x_next = x + (sigma_next - sigma) v and x = (1 - sigma) x0 + sigma noise with
    v = noise - x0, so x0 = x - sigma v."""
    config = CONFIGS[name]
    scheduler = scheduler_from_config(config)
    rows = [(28, 0), (28, 13), (5, 4), (50, 30)]  # (num_steps, step index)
    schedules = [scheduler.schedule(n, IMAGE_SEQ_LEN) for n, _ in rows]
    indices = [i for _, i in rows]
    x = torch.stack([initial_noise(r) for r in range(len(rows))])
    out = fake_model(x, scheduler.timesteps(schedules, indices).view(-1, 1, 1, 1))
    got = scheduler.predict_x0(x, out, schedules, indices)
    for b, (num_steps, i) in enumerate(rows):
        ref = diffusers_scheduler(config, num_steps)
        t, xb, vb = ref.timesteps[i], x[b : b + 1], out[b : b + 1]
        if isinstance(ref, DDIMScheduler):
            expected = ref.step(vb, t, xb).pred_original_sample
        else:
            sigma, sigma_next = ref.sigmas[i], ref.sigmas[i + 1]
            v = (ref.step(vb, t, xb).prev_sample - xb) / (sigma_next - sigma)
            expected = xb - sigma * v
        torch.testing.assert_close(got[b], expected[0], rtol=1e-4, atol=1e-4,
                                   msg=f"{name} row {b}")


def test_timestep_dtypes_and_values() -> None:
    flow, ddim = scheduler_from_config(SD3), scheduler_from_config(DIT)
    s = flow.schedule(28, IMAGE_SEQ_LEN)
    assert s.num_steps == 28 and flow.timesteps([s], [0]).dtype == torch.float32
    reference_flow = FlowMatchEulerDiscreteScheduler.from_config(SD3)
    reference_flow.set_timesteps(28)
    assert torch.equal(s.timesteps, reference_flow.timesteps)
    d = ddim.schedule(50, IMAGE_SEQ_LEN)
    assert ddim.timesteps([d, d], [0, 49]).tolist() == [980, 0]
    assert ddim.timesteps([d], [0]).dtype == torch.int64


def test_reduced_precision_dtypes() -> None:
    """bf16 / fp16: the dtype diffusers returns, values within rounding of diffusers' result.

    Not bit-exact: diffusers rounds intermediates (dt * v; every DDIM op) to the reduced dtype,
    we round once from float32; one step differs by at most about one ulp of the result.
    """
    for config, dtype in ((SD3, torch.bfloat16), ({**DIT, "clip_sample": True}, torch.float16)):
        scheduler = scheduler_from_config(config)
        schedule = scheduler.schedule(10, IMAGE_SEQ_LEN)
        ref = type(scheduler).diffusers_class.from_config(config)
        ref.set_timesteps(10)
        x = initial_noise(0)[None].to(dtype)
        out = fake_model(x, ref.timesteps[3]).to(dtype)
        expected = ref.step(out, ref.timesteps[3], x).prev_sample
        got = scheduler.step(x, out, [schedule], [3])
        assert got.dtype == expected.dtype == dtype
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(got.float(), expected.float(), rtol=eps, atol=eps)


def test_load_scheduler_reads_the_folder(tmp_path) -> None:
    (tmp_path / "scheduler_config.json").write_text(json.dumps(DIT))
    assert isinstance(load_scheduler(tmp_path), BatchedDDIM)
    (tmp_path / "scheduler_config.json").write_text(json.dumps(SD3))
    assert isinstance(load_scheduler(str(tmp_path)), BatchedFlowMatchEuler)


@pytest.mark.parametrize("config, named", [
    ({"_class_name": "EulerDiscreteScheduler"}, "EulerDiscreteScheduler"),
    ({}, "None"),
    ({**SD3, "stochastic_sampling": True}, "stochastic_sampling"),
    ({**SD3, "invert_sigmas": True}, "invert_sigmas"),
    ({**DIT, "thresholding": True}, "thresholding"),
    ({**DIT, "an_option_from_the_future": 1}, "an_option_from_the_future"),
])
def test_unsupported_config_is_refused(config: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        scheduler_from_config(config)


@pytest.mark.parametrize("config, num_steps", [
    (DIT, 1001), (DIT, 0), (SD3, 0), (SD3, -3), (SD3, 2.5),
    ({**DIT, "steps_offset": 1}, 1000),  # the last timestep would be 1000
])
def test_num_steps_out_of_range(config: dict, num_steps) -> None:
    with pytest.raises(ValueError, match="num_steps"):
        scheduler_from_config(config).schedule(num_steps, IMAGE_SEQ_LEN)


def test_step_index_out_of_range() -> None:
    scheduler = scheduler_from_config(SD3)
    s = scheduler.schedule(3, IMAGE_SEQ_LEN)
    x = torch.zeros((1, *SHAPE))
    with pytest.raises(IndexError):
        scheduler.step(x, x, [s], [3])
    with pytest.raises(IndexError):
        scheduler.timesteps([s], [-1])

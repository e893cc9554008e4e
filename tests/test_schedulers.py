"""The numpy samplers against diffusers' schedulers, step for step."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from diffugts.config import get_preset
from diffugts.schedulers import DDIMSampler, FlowSampler, img2img_tail, make_sampler


def reference_ddim(steps):
    ref = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195,
                        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                        steps_offset=0, timestep_spacing="leading", prediction_type="epsilon")
    ref.set_timesteps(steps)
    return ref


@pytest.mark.parametrize("steps,strength", [(10, 1.0), (10, 0.6), (25, 0.3), (50, 1.0)])
def test_ddim_matches_diffusers_step_for_step(steps, strength, rng):
    ours = DDIMSampler(1000, steps)
    ref = reference_ddim(steps)
    expected_t = img2img_tail(ref.timesteps.numpy(), strength)
    np.testing.assert_array_equal(ours.timesteps(strength), expected_t)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-6)

    x0 = rng.standard_normal((1, 4, 6, 6, 6)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    ours_x = ours.add_noise(x0, noise, expected_t[0])
    ref_x = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.tensor([expected_t[0]]))
    np.testing.assert_allclose(ours_x, ref_x.numpy(), rtol=1e-5, atol=1e-5)
    for t in expected_t:
        eps = rng.standard_normal(x0.shape).astype(np.float32)
        ours_x = ours.step(eps, t, ours_x)
        ref_x = ref.step(torch.from_numpy(eps), int(t), ref_x).prev_sample
        np.testing.assert_allclose(ours_x, ref_x.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps,strength", [(30, 1.0), (30, 0.5), (8, 0.75)])
def test_flow_matches_diffusers_step_for_step(steps, strength, rng):
    ours = FlowSampler(1000, steps)
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    ref.set_timesteps(steps)
    full = ref.timesteps.numpy()
    tail = img2img_tail(full, strength)
    ref.set_begin_index(len(full) - len(tail))
    np.testing.assert_allclose(ours.timesteps(strength), tail, rtol=1e-6)

    x0 = rng.standard_normal((1, 4, 4, 4, 4)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    ours_x = ours.add_noise(x0, noise, tail[0])
    ref_x = ref.scale_noise(torch.from_numpy(x0), torch.tensor([tail[0]]), torch.from_numpy(noise))
    np.testing.assert_allclose(ours_x, ref_x.numpy(), rtol=1e-5, atol=1e-6)
    for t in tail:
        v = rng.standard_normal(x0.shape).astype(np.float32)
        ours_x = ours.step(v, t, ours_x)
        ref_x = ref.step(torch.from_numpy(v), torch.tensor(t), ref_x).prev_sample
        np.testing.assert_allclose(ours_x, ref_x.numpy(), rtol=1e-5, atol=1e-5)


def test_chain_ends_on_the_clean_sample(rng):
    x0 = rng.standard_normal((2, 3)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    for sampler in (DDIMSampler(1000, 10), FlowSampler(1000, 10)):
        last = sampler.timesteps(1.0)[-1]
        np.testing.assert_array_equal(sampler.add_noise(x0, noise, sampler.next_timestep(last)), x0)


def test_monai_rflow_velocity_sign_is_flipped(rng):
    x = rng.standard_normal((3,)).astype(np.float32)
    v = rng.standard_normal((3,)).astype(np.float32)
    t = FlowSampler(1000, 5).timesteps()[0]
    plus = FlowSampler(1000, 5, 1.0).step(v, t, x)
    minus = FlowSampler(1000, 5, -1.0).step(-v, t, x)
    np.testing.assert_allclose(plus, minus)


def test_bad_strength_and_scheduler_rejected():
    with pytest.raises(ValueError, match="strength"):
        DDIMSampler().timesteps(0.0)
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_sampler(get_preset("tiny").with_(scheduler="euler"))

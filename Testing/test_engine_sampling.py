"""Training patches (sampling.py), prediction padding (inference.py) and the memory-mapped cache (preprocess.py)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from engine_fixtures import trained_run

from MNSegmentLib.data.datalist import load_datalist
from MNSegmentLib.data.preprocess import Plan
from MNSegmentLib.data.sampling import PatchSampler
from MNSegmentLib.events import Events
from MNSegmentLib.inference.predict import predict_array
from MNSegmentLib.training.trainer import Trainer


def _sampler(image, label, patch, foreground_fraction=0.5, scale_jitter=0.0) -> PatchSampler:
    return PatchSampler([image], [label], patch, foreground_fraction, scale_jitter, intensity_aug=False)


# -- item 2: labels stay on their voxels under scale jitter ---------------------------------------------------
def test_scale_jittered_label_stays_aligned_with_its_image():
    # a 3D checkerboard of 3-voxel blocks; the image is the label as a float, so wherever the trilinearly
    # resampled image is clearly 0 or 1, the resampled label must say the same
    grid = np.indices((40, 40, 40)) // 3
    label = (grid.sum(0) % 2).astype(np.uint8)
    sampler = _sampler(label.astype(np.float32), label, [16, 16, 16], scale_jitter=0.3)
    images, labels = sampler.crop(40, np.random.default_rng(0))
    images, labels = images.numpy(), labels.numpy()
    confident = (images < 0.2) | (images > 0.8)
    assert confident.mean() > 0.2  # the check below covers many voxels
    wrong = (labels != (images > 0.5))[confident]
    assert wrong.sum() == 0, f"{wrong.sum()} of {confident.sum()} confident voxels mislabeled"


# -- item 3: crops stay inside the volume; padding is the same for image and label and at prediction ---------
@pytest.mark.parametrize("foreground_fraction", [0.0, 1.0])
def test_crops_stay_inside_a_volume_larger_than_the_patch(foreground_fraction):
    shape, patch = (24, 20, 16), np.array([8, 8, 8])
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)  # every voxel value says where it is
    label = np.zeros(shape, np.uint8)
    label[0, 0, 0] = label[-1, -1, -1] = 1  # foreground only in two corners: centred crops would stick out
    sampler = _sampler(image, label, patch.tolist(), foreground_fraction)
    images, labels = sampler.crop(60, np.random.default_rng(1))
    for crop, crop_label in zip(images[:, 0].numpy(), labels[:, 0].numpy()):
        start = np.array(np.unravel_index(int(crop[0, 0, 0]), shape))
        assert np.all(start + patch <= shape)
        expected = tuple(slice(s, s + p) for s, p in zip(start, patch))
        np.testing.assert_array_equal(crop, image[expected])  # a real sub-volume: no padding at all
        np.testing.assert_array_equal(crop_label, label[expected])
        if foreground_fraction == 1:
            assert crop_label.sum() >= 1  # still aimed at the foreground


def test_volume_smaller_than_the_patch_is_edge_padded_in_image_and_label():
    shape, patch = (5, 12, 12), [9, 8, 8]  # smaller than the patch along axis 0 only
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    label = np.zeros(shape, np.uint8)
    label[:, 3:9, 3:9] = 1  # the structure touches both borders of axis 0
    sampler = _sampler(image, label, patch, foreground_fraction=0.5)
    rng = np.random.default_rng(2)
    images, labels = sampler.crop(10, rng)
    assert images.shape == labels.shape == (10, 1, *patch)
    for crop, crop_label in zip(images[:, 0].numpy(), labels[:, 0].numpy()):
        # the volume sits centred in the crop along axis 0 (2 slices before, 2 after), is cropped inside the
        # volume along the others, and is continued by its border slices in the image and the label alike
        x, y, z = np.unravel_index(int(crop[2, 0, 0]), shape)
        assert x == 0 and y + 8 <= 12 and z + 8 <= 12
        np.testing.assert_array_equal(crop[2:7], image[:, y:y + 8, z:z + 8])
        np.testing.assert_array_equal(crop_label[2:7], label[:, y:y + 8, z:z + 8])
        for pad, border in ((0, 2), (1, 2), (7, 6), (8, 6)):
            np.testing.assert_array_equal(crop[pad], crop[border])
            np.testing.assert_array_equal(crop_label[pad], crop_label[border])
    # and it trains: sampled with intensity augmentation, finite
    sampler = PatchSampler([image], [label], patch, 0.5, 0.1, intensity_aug=True)
    x, y = sampler.sample(3, rng)
    assert x.shape == y.shape == (3, 1, *patch) and torch.isfinite(x).all()


def test_prediction_edge_pads_a_volume_smaller_than_the_patch():
    volume = np.random.default_rng(3).normal(size=(6, 10, 10)).astype(np.float32) + 5.0
    seen = []

    def predict(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return torch.cat([x, -x], 1)

    out = predict_array(volume, predict, [8, 10, 10], torch.device("cpu"))
    assert out.shape == (2, 6, 10, 10)
    window = seen[0][0, 0].numpy()
    assert window.shape == (8, 10, 10)  # 1 slice padded on each side of axis 0
    np.testing.assert_array_equal(window[1:7], volume)
    np.testing.assert_array_equal(window[0], volume[0])
    np.testing.assert_array_equal(window[7], volume[-1])


# -- item 11: the cache is memory-mapped and training works from it ---------------------------------------------
def test_cached_volumes_are_memory_mapped_and_train(tmp_path_factory):
    run_dir = trained_run(tmp_path_factory).run_dir
    config = json.loads((run_dir / "config.json").read_text())
    plan = Plan.from_json(json.loads((run_dir / "plan.json").read_text()))
    datalist = load_datalist(run_dir / "datalist.json", check_files=False)
    trainer = Trainer(run_dir, config, plan, datalist, torch.device("cpu"), Events(False))
    arrays = trainer.labeled.images + trainer.labeled.labels + trainer.unlabeled.images
    assert arrays and all(isinstance(a, np.memmap) and not a.flags.writeable for a in arrays)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. torch's warning about non-writable arrays
        trainer.config["lrg"].update(mode="fixed", share=0.5, cap=1.0)
        trainer.step = trainer.stage2  # a co-training step: labeled and unlabeled patches
        record = trainer.train_step()
        mask = trainer._predict_volume(trainer.unlabeled.images[0])
    assert np.isfinite(record["loss_2d"])
    assert mask.shape == trainer.unlabeled.images[0].shape

"""The data order of a seed is a property of the data, not of where it was prepared: the same images prepared from
another folder (another machine) give a cache with another manifest digest but train in the same order."""

from pipeline.manifest import read_manifest
from pipeline.train.data import CacheIndex, EpochPlanner
from tests.helpers.training import cached_dataset


def _order(root, seed: int) -> list[tuple[str, ...]]:
    cache = root / "cache"
    index = CacheIndex(cache, read_manifest(cache, stage="cache"))
    planner = EpochPlanner(index, seed=seed, global_batch=1, sampling="auto-weighting")
    return [batch.keys for epoch in (0, 1) for batch in planner.epoch(epoch)]


def test_the_same_images_prepared_from_another_folder_train_in_the_same_order(cached, tiny_model, tmp_path):
    here, _ = cached("sd1x")
    elsewhere = tmp_path / "another" / "folder"
    cached_dataset(elsewhere, "sd1x", tiny_model("sd1x"))
    digests = [read_manifest(root / "cache", stage="cache")["digest"] for root in (here, elsewhere)]
    assert digests[0] != digests[1]  # the prepare manifest records the data folder, and the cache's digest covers it
    assert _order(here, 7) == _order(elsewhere, 7)
    assert _order(here, 7) != _order(here, 8)  # the seed still decides the order

"""The dataset registry: one entry per name, read by every entry point."""

import pytest

from unic.data.registry import DATASETS, KINDS, PROTOCOLS, DatasetSpec, dataset_names, get_dataset, register, registered


def test_entries_are_complete():
    for spec in DATASETS.values():
        assert spec.kind in KINDS and spec.protocol in PROTOCOLS and spec.layout and spec.splits
        if spec.kind == "transfer":
            assert callable(spec.reader()) and spec.splits == ("trainval", "test")
    assert dataset_names(trainable=True) == ["demo", "uned", "imagenet", "csv", "wds"]
    assert get_dataset("ade20k").defaults["num_classes"] == 150
    assert get_dataset("eurosat").defaults["counts"] == (10, 18_900, 8100)


def test_unknown_names_get_the_closest_and_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown dataset 'aircarft'; did you mean 'aircraft'\?"):
        get_dataset("aircarft")
    with pytest.raises(ValueError, match=r"known: demo, uned, folder, imagenet\)"):
        get_dataset("dtd", kinds=("uned", "folder", "imagenet"))


def test_register_refuses_taken_names_and_unknown_kinds():
    spec = DatasetSpec("my_sop", "folder", "retrieval", "root/<class>/<image>", ("test",))
    with registered(spec):
        assert get_dataset("my_sop") is spec and "my_sop" in dataset_names(kind="folder")
        with pytest.raises(ValueError, match="registered already"):
            register(spec)
    assert "my_sop" not in DATASETS
    with pytest.raises(ValueError, match="kind must be one of"):
        register(DatasetSpec("x", "zip", "retrieval", "", ()))

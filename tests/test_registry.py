"""The dataset registry: one entry per name, read by every entry point."""

import pytest

from unic.data.registry import DATASETS, KINDS, PROTOCOLS, dataset_names, get_dataset, parse_dataset


def test_entries_are_complete():
    for spec in DATASETS.values():
        assert spec.kind in KINDS and spec.protocol in PROTOCOLS and spec.layout and spec.splits
        if spec.kind == "transfer":
            assert callable(spec.reader()) and spec.splits == ("trainval", "test")
    assert dataset_names(trainable=True) == ["demo", "uned", "imagenet"]
    assert get_dataset("ade20k").defaults["num_classes"] == 150
    assert get_dataset("eurosat").defaults["counts"] == (10, 18_900, 8100)


def test_unknown_names_get_the_closest_and_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown dataset 'aircarft'; did you mean 'aircraft'\?"):
        get_dataset("aircarft")
    with pytest.raises(ValueError, match=r"known: demo, uned, folder, imagenet\)"):
        get_dataset("dtd", kinds=("uned", "folder", "imagenet"))


def test_dinov2_style_specs():
    spec, options = parse_dataset("dtd:split_no=3:strict=0")
    assert spec.name == "dtd" and options == {"split_no": "3", "strict": "0"}
    with pytest.raises(ValueError, match="not of the form key=value"):
        parse_dataset("dtd:3")

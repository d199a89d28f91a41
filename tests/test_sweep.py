"""The sweep mini-language (ditjax.sweep): expansion semantics, names, config loading."""
import textwrap

import pytest

from ditjax import sweep as hyper


def test_product_is_nested_loops_first_sweep_slowest():
    points = hyper.product(hyper.sweep("a", [1, 2]), hyper.sweep("b", ["x", "y"]), hyper.fixed("seed", 0))
    assert points == [{"a": 1, "b": "x", "seed": 0}, {"a": 1, "b": "y", "seed": 0},
                      {"a": 2, "b": "x", "seed": 0}, {"a": 2, "b": "y", "seed": 0}]


def test_product_edge_cases():
    assert hyper.product() == [{}]
    assert hyper.product(hyper.sweep("a", [])) == []
    assert hyper.product(hyper.fixed("a", 1)) == [{"a": 1}]


def test_zipit_pairs_and_composes_with_product():
    widths = hyper.zipit(hyper.sweep("model.hidden_size", [64, 128]), hyper.sweep("model.num_heads", [2, 4]))
    assert widths == [{"model.hidden_size": 64, "model.num_heads": 2},
                      {"model.hidden_size": 128, "model.num_heads": 4}]
    points = hyper.product(widths, hyper.sweep("optim.lr", [0.1, 0.2]))
    assert len(points) == 4
    assert points[1] == {"model.hidden_size": 64, "model.num_heads": 2, "optim.lr": 0.2}


def test_zipit_needs_equal_lengths():
    with pytest.raises(ValueError, match="equal length"):
        hyper.zipit(hyper.sweep("a", [1, 2]), hyper.sweep("b", [1]))


def test_a_key_set_twice_is_an_error():
    with pytest.raises(ValueError, match=r"\['a'\]"):
        hyper.product(hyper.sweep("a", [1]), hyper.fixed("a", 2))
    with pytest.raises(ValueError):
        hyper.zipit(hyper.sweep("a", [1]), hyper.sweep("a", [2]))


def test_big_vision_list_spelling_is_rejected_clearly():
    with pytest.raises(TypeError, match="separate arguments"):
        hyper.product([hyper.sweep("a", [1]), hyper.sweep("b", [2])])


def test_log2_range():
    assert hyper.log2_range(-3, -1) == [0.125, 0.25, 0.5]
    widths = hyper.log2_range(6, 10, step=2)
    assert widths == [64, 256, 1024] and all(type(w) is int for w in widths)  # ints: int config fields
    with pytest.raises(ValueError):
        hyper.log2_range(0, 3, step=0)


def test_point_name_is_readable_stable_and_order_independent():
    # Pinned: a name that changed between releases would re-run every finished point.
    assert hyper.point_name({"optim.lr": 2**-10, "model.hidden_size": 128}) == "hidden_size=128_lr=0.000977_2f8eb649"
    assert hyper.point_name({"model.hidden_size": 128, "optim.lr": 2**-10}) == "hidden_size=128_lr=0.000977_2f8eb649"
    assert hyper.point_name({"data.name": "digits/v2 x"}).startswith("name=digits-v2-x_")


def test_point_names_unique_even_when_readable_part_collides():
    # 0.0009765625 and 0.000977 print alike; 1 and 1.0 and True differ as config values.
    points = hyper.product(hyper.sweep("optim.lr", [2**-10, 0.000977, 1, 1.0, True]),
                           hyper.sweep("model.hidden_size", hyper.log2_range(4, 9)))
    names = [hyper.point_name(p) for p in points]
    assert len(set(names)) == len(points)
    long = [{"k" * 200: i} for i in range(3)]
    long_names = [hyper.point_name(p) for p in long]
    assert len(set(long_names)) == 3 and all(len(n) <= 80 + 9 for n in long_names)


def _write_config(tmp_path, body):
    path = tmp_path / "cfg.py"
    path.write_text(textwrap.dedent("""\
        import ml_collections
        from ditjax import sweep as hyper

        def get_config(arg=None):
            c = ml_collections.ConfigDict()
            c.model = ml_collections.ConfigDict({"hidden_size": 64})
            c.optim = ml_collections.ConfigDict({"lr": 1e-3})
            c.seed = 0
            return c
        """) + textwrap.dedent(body))
    return path


def test_load_sweep_passes_the_config_arg(tmp_path):
    path = _write_config(tmp_path, """
        def get_sweep(arg=None):
            lrs = [0.1] if arg == "small" else [0.1, 0.2, 0.3]
            return hyper.product(hyper.sweep("optim.lr", lrs), hyper.fixed("seed", 1))
        """)
    assert len(hyper.load_sweep(str(path))) == 3
    assert hyper.load_sweep(f"{path}:small") == [{"optim.lr": 0.1, "seed": 1}]


def test_load_sweep_rejects_unknown_keys_and_duplicates(tmp_path):
    path = _write_config(tmp_path, """
        def get_sweep(arg=None):
            if arg == "typo":
                return hyper.sweep("optim.lrr", [0.1])
            if arg == "leaf":
                return hyper.sweep("model.hidden_size.d", [1])
            return hyper.sweep("optim.lr", [0.1, 0.1])
        """)
    with pytest.raises(KeyError, match="optim.lrr"):
        hyper.load_sweep(f"{path}:typo")
    with pytest.raises(KeyError, match="hidden_size.d"):
        hyper.load_sweep(f"{path}:leaf")
    with pytest.raises(ValueError, match="duplicate"):
        hyper.load_sweep(str(path))


def test_config_without_get_sweep(tmp_path):
    path = _write_config(tmp_path, "")
    with pytest.raises(ValueError, match="no get_sweep"):
        hyper.load_sweep(str(path))

"""Recipe loading: strict keys, types, validation, overrides, round trip, and every shipped recipe."""

from pathlib import Path

import pytest

from nlplatform.config import RecipeConfig
from nlplatform.errors import ConfigError
from nlplatform.recipe import load_recipe, recipe_from_dict, recipe_to_dict, recipe_to_yaml, resumable_keys

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*/*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", RECIPES, ids=[f"{p.parent.name}/{p.name}" for p in RECIPES])
def test_every_shipped_recipe_loads(path):
    """Each file under recipes/ loads strictly and names its own family and preset (and variant: tiny_mac.yaml, or CMS
    variant: tiny_nested.yaml)."""
    cfg = load_recipe(path)
    assert cfg.model.name == path.parent.name
    named = {cfg.model.preset}
    for key in ("variant", "cms_variant"):
        if hasattr(cfg.model, key):
            named.add(f"{cfg.model.preset}_{getattr(cfg.model, key)}")
    assert path.stem in named


def test_preset_fills_family_fields_and_keys_override_them(tmp_path):
    """model.preset supplies the family's sizes; explicit model keys and command-line overrides win, in that order."""
    path = write(tmp_path, "model: {name: transformer, preset: tiny, n_layers: 3}\n")
    cfg = load_recipe(path)
    assert cfg.model.d_model == 256 and cfg.model.n_layers == 3
    cfg = load_recipe(path, ["model.n_layers=1", "optim.lr=1e-4", "data.paths=[a.txt,b.txt]"])
    assert cfg.model.n_layers == 1 and cfg.optim.lr == 1e-4 and cfg.data.paths == ["a.txt", "b.txt"]


def test_override_can_switch_preset(tmp_path):
    """A command-line model.preset override picks the other preset's sizes."""
    cfg = load_recipe(write(tmp_path, "model: {name: transformer}\n"), ["model.preset=340m"])
    assert cfg.model.preset == "340m" and cfg.model.d_model == 1024


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        pytest.param("optim: {lrr: 0.1}\n", [], "Did you mean 'optim.lr'", id="typo-in-file"),
        pytest.param("", ["trainer.max_step=5"], "Did you mean 'trainer.max_steps'", id="typo-override"),
        pytest.param("", ["model.n_layer=2"], "Did you mean 'model.n_layers'", id="typo-family-field"),
        pytest.param("", ["modle.name=x"], "Did you mean 'model'", id="typo-section"),
        pytest.param("", ["model.name=transfomer"], "Did you mean 'transformer'", id="typo-family"),
        pytest.param("", ["model.preset=tiy"], "Did you mean 'tiny'", id="typo-preset"),
        pytest.param("", ["optim.name=adamw2"], "Did you mean 'adamw'", id="typo-optimizer"),
    ],
)
def test_unknown_names_fail_with_did_you_mean(tmp_path, text, overrides, expected):
    """Misspelt keys and names raise ConfigError with a suggestion."""
    with pytest.raises(ConfigError, match=expected):
        load_recipe(write(tmp_path, text), overrides)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param(["optim.lr=abc"], "optim.lr", id="wrong-type"),
        pytest.param(["optim.lr=0"], "optim.lr must be > 0", id="zero-lr"),
        pytest.param(["optim.lr=-1e-3"], "optim.lr must be > 0", id="negative-lr"),
        pytest.param(["data.seq_len=0"], "data.seq_len must be > 0", id="zero-seq-len"),
        pytest.param(["data.batch_size=-2"], "data.batch_size must be > 0", id="negative-batch"),
        pytest.param(["trainer.max_steps=0"], "trainer.max_steps must be > 0", id="zero-steps"),
        pytest.param(["model.d_model=-8"], "d_model", id="negative-width"),
        pytest.param(["model.d_model=250"], "n_heads", id="width-not-divisible-by-heads"),
        pytest.param(["data.tokenizer=words"], "data.tokenizer", id="unknown-tokenizer"),
        pytest.param(["model.kernel_backend=cuda"], "model.kernel_backend", id="literal-choice"),
        pytest.param(["tracking.experiment=a/b"], "plain name", id="bad-experiment-name"),
        pytest.param(["optim=3"], "section", id="section-given-a-value"),
        pytest.param(["optim.lr"], "key=value", id="override-without-value"),
    ],
)
def test_bad_values_fail_with_the_key_named(tmp_path, overrides, expected):
    """Wrong types and impossible values raise ConfigError naming the key."""
    with pytest.raises(ConfigError, match=expected):
        load_recipe(write(tmp_path, ""), overrides)


def test_missing_recipe_file_is_a_config_error(tmp_path):
    """A recipe path that does not exist raises ConfigError naming it."""
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_invalid_yaml_is_a_config_error(tmp_path):
    """A file that is not a YAML mapping raises ConfigError."""
    with pytest.raises(ConfigError, match="YAML|mapping"):
        load_recipe(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_recipe(write(tmp_path, "- just\n- a list\n"))


def test_round_trip_through_dict_and_yaml(tmp_path):
    """A recipe saved as a dict or YAML loads back to an equal recipe."""
    cfg = load_recipe(ROOT / "recipes/transformer/tiny.yaml", ["model.vocab_size=257", "seed=7"])
    assert recipe_from_dict(recipe_to_dict(cfg)) == cfg
    again = load_recipe(write(tmp_path, recipe_to_yaml(cfg)))
    assert again == cfg
    assert isinstance(again, RecipeConfig)


PAPER_SIZE_RECIPES = sorted(p for p in RECIPES if p.stem in ("340m", "760m", "1.3b"))


@pytest.mark.parametrize("path", PAPER_SIZE_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_paper_size_recipes_use_the_papers_training_setup(path):
    """Every paper-size recipe trains as the Titans / Gated DeltaNet papers do (and Nested Learning defers to): AdamW
    at lr 4e-4, weight decay 0.1, warm-up over 1B tokens (2000 steps of 0.5M), cosine to 10% of the peak, gradient
    clip 1.0, 4K windows, 0.5M-token batches (seq_len x batch x devices x accumulation = 2^19) and a 32K BPE
    vocabulary trained on the corpus."""
    cfg = load_recipe(path)
    o, d, t = cfg.optim, cfg.data, cfg.trainer
    assert (o.name, o.lr, o.weight_decay, o.warmup_steps, o.min_lr_ratio) == ("adamw", 4e-4, 0.1, 2000, 0.1)
    assert t.gradient_clip_val == 1.0 and d.seq_len == 4096
    assert d.seq_len * d.batch_size * t.devices * t.num_nodes * t.accumulate_grad_batches == 2**19
    assert (d.tokenizer, d.bpe_vocab_size) == ("bpe", 32000)


def test_hopes_window_is_data_seq_len_and_not_a_recipe_key(tmp_path):
    """HOPE's training window (in-context vs persistent levels) is derived from data.seq_len in one place: a recipe
    may not set it, chunk sizes are checked against the real window, and saved recipes leave it out."""
    hope = ROOT / "recipes/hope/tiny.yaml"
    with pytest.raises(ConfigError, match="'model.context_len' is not set in recipes: it is data.seq_len"):
        load_recipe(hope, ["model.context_len=64"])
    # in-context levels must divide one another: [64, 96] are both in-context below a window of 256, only 64 below 96
    cfg = load_recipe(hope, ["data.seq_len=96", "model.cms_chunk_sizes=[64,96,8192]"])
    assert cfg.model.context_len == 96 and cfg.model.cms_in_context == [True, False, False]
    with pytest.raises(ConfigError, match="must each divide the next larger one"):
        load_recipe(hope, ["data.seq_len=256", "model.cms_chunk_sizes=[64,96,8192]"])
    assert "context_len" not in recipe_to_dict(cfg)["model"] and "context_len" not in recipe_to_yaml(cfg)


def test_a_saved_recipe_with_a_retired_key_loads_and_says_so_once(capsys):
    saved = recipe_to_dict(load_recipe(ROOT / "recipes/hope/tiny.yaml", ["data.seq_len=128"]))
    saved["model"]["context_len"] = 256  # what recipes saved before the window was derived hold
    with pytest.raises(ConfigError, match="model.context_len"):
        recipe_from_dict(saved)
    first = recipe_from_dict(saved, saved=True)
    again = recipe_from_dict(saved, saved=True)
    assert first.model.context_len == again.model.context_len == 128  # from data.seq_len, not the stale value
    err = capsys.readouterr().err
    assert err.count("saved recipe: dropped model.context_len (HOPE's training window is data.seq_len)") <= 1


def test_the_keys_that_may_change_on_resume_are_declared_in_the_schema():
    keys = resumable_keys(load_recipe(ROOT / "recipes/transformer/tiny.yaml"))
    assert {
        "trainer.max_steps",
        "trainer.devices",
        "trainer.num_nodes",
        "trainer.resume",
        "tracking.run_name",
        "tracking.experiment",
        "output_dir",
    } <= set(keys)
    assert keys["data.batch_size"] == keys["trainer.accumulate_grad_batches"] == "tokens per step"
    assert not {"optim.lr", "data.seq_len", "seed", "model.d_model", "trainer.precision"} & set(keys)


def test_an_optimizer_chosen_by_name_takes_its_default_rate_unless_one_is_given_for_it(tmp_path, capsys):
    """A recipe's optim.lr belongs to the optimizer it names (AdamW when none): switching optim.name on the command
    line gives the new optimizer its own default rate and says so on stderr; optim.lr given with it wins, and a
    recipe without optim.lr takes its optimizer's default."""
    from nlplatform.optim import DEFAULT_LR

    tiny = ROOT / "recipes/hope/tiny.yaml"
    assert load_recipe(tiny).optim.lr == 3e-3 and DEFAULT_LR["dmgd"] == 0.3  # the recipe's AdamW rate
    switched = load_recipe(tiny, ["optim.name=dmgd"]).optim
    assert (switched.name, switched.lr) == ("dmgd", DEFAULT_LR["dmgd"])
    assert "optim.lr=0.3: dmgd's default rate (the recipe's optim.lr=0.003 is for adamw" in capsys.readouterr().err
    assert load_recipe(tiny, ["optim.name=delta_momentum", "optim.lr=0.05"]).optim.lr == 0.05
    assert load_recipe(tiny, ["optim.lr=0.05", "optim.name=muon"]).optim.lr == 0.05
    assert capsys.readouterr().err == ""
    own = write(tmp_path, "optim: {name: momentum, lr: 0.02}\n")
    assert load_recipe(own).optim.lr == 0.02 and load_recipe(own, ["optim.name=momentum"]).optim.lr == 0.02
    assert load_recipe(own, ["optim.name=m3"]).optim.lr == DEFAULT_LR["m3"]
    for name, rate in DEFAULT_LR.items():
        assert load_recipe(write(tmp_path, f"optim: {{name: {name}}}\n")).optim.lr == rate
    saved = load_recipe(tiny, ["optim.name=dmgd"])
    assert recipe_from_dict(recipe_to_dict(saved)) == saved  # a saved recipe keeps the rate it trained with


def test_tiny_hope_trains_at_lr_3e3_on_8_windows_of_256_tokens_for_150_steps():
    """The documented settings of the default recipe (`make train`): AdamW at 3e-3, 150 steps of 8 x 256 tokens."""
    cfg = load_recipe(ROOT / "recipes" / "hope" / "tiny.yaml")
    assert (cfg.optim.name, cfg.optim.lr, cfg.trainer.max_steps) == ("adamw", 3e-3, 150)
    assert (cfg.data.batch_size, cfg.data.seq_len) == (8, 256)

"""Settings from the environment and the models file (DESIGN sections 4 and 7)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from actors.models import active_version, choose_model, endpoint_api_key
from parley.config import DEMO_MODEL, ConfigError, load_catalog, settings_from_env

MODELS_TOML = """
[[models]]
name = "house"
base_url = "http://127.0.0.1:9000/v1"
api_key_env = "HOUSE_KEY"
max_output_tokens = 4096
  [[models.versions]]
  version = "2025-06"
  status = "active"
  release_date = 2025-06-01
  input_price = 1.0
  output_price = 2.0
  [[models.versions]]
  version = "2026-01"
  status = "active"
  is_default = true
  release_date = 2026-01-15
  input_price = 3.0
  output_price = 15.0
  [[models.versions]]
  version = "2026-03"
  status = "deprecated"
  release_date = 2026-03-01
  input_price = 0.5
  output_price = 0.5
"""


# webhook settings that work: a Standard Webhooks secret of 24 bytes
HOOK = {
    "PARLEY_WEBHOOK_URL": "https://hooks.example.com/parley",
    "PARLEY_WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
}


def test_unset_variables_mean_the_embedded_stack_and_the_demo_model(tmp_path: Path) -> None:
    settings = settings_from_env({}, tmp_path)
    assert settings.embedded and settings.data_dir == tmp_path
    catalog = load_catalog(settings, env={})
    assert catalog.default_model == DEMO_MODEL
    demo = catalog.get(None)
    assert demo is not None and active_version(demo) is not None


def test_server_urls_and_model_settings_come_from_the_environment(tmp_path: Path) -> None:
    settings = settings_from_env(
        {
            "PARLEY_NATS_URL": "nats://n:4222",
            "PARLEY_DATABASE_URL": "postgresql://p/db",
            "PARLEY_REDIS_URL": "redis://r/0",
            "PARLEY_MODEL_BASE_URL": "http://m/v1",
            "PARLEY_MODEL_API_KEY": "sk-1",
            "PARLEY_MODEL": "gpt-x",
            "PARLEY_JWT_SECRET": "j" * 32,
            "PARLEY_RATE_PER_S": "5",
            "PARLEY_MAX_TURNS_PER_USER": "2",
            "PARLEY_LOG_FORMAT": "JSON",
        },
        tmp_path,
    )
    assert not settings.embedded
    assert settings.jwt_secret == "j" * 32
    assert (settings.limits.rate_per_s, settings.limits.max_turns_per_user) == (5.0, 2)
    assert settings.log_format == "json"
    assert (settings.nats_url, settings.model_base_url, settings.model_api_key) == (
        "nats://n:4222",
        "http://m/v1",
        "sk-1",
    )
    catalog = load_catalog(settings, env={})
    assert catalog.default_model == "gpt-x" and catalog.get("gpt-x") is not None


def test_the_models_file_gives_endpoint_key_limits_and_the_price_in_force(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(MODELS_TOML)
    settings = settings_from_env({"PARLEY_MODELS_FILE": str(path)}, tmp_path)
    catalog = load_catalog(settings, env={"HOUSE_KEY": "sk-house"})
    house = catalog.get("house")
    assert house is not None
    assert house.base_url == "http://127.0.0.1:9000/v1" and house.api_key == "sk-house"
    assert house.max_output_tokens == 4096
    version = active_version(house)
    assert version is not None and version.version == "2026-01"  # default beats newer
    assert version.release_date == dt.date(2026, 1, 15)
    choice = choose_model(house)
    assert (choice.prices.input_price, choice.prices.output_price) == (3.0, 15.0)
    assert choice.max_tokens == 4096 and choice.temperature == 0.7
    assert catalog.get(DEMO_MODEL) is not None, "the demo entry stays"
    # unset, a model is asked as OpenAI's chat models are
    assert (house.max_tokens_field, house.include_usage) == ("max_tokens", True)
    assert house.tool_call_content == "null"


def test_the_models_file_says_what_a_strict_endpoint_accepts(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        '[[models]]\nname = "o3"\ntemperature = 1.0\n'
        'max_tokens_field = "max_completion_tokens"\ninclude_usage = false\n'
        'tool_call_content = "empty"\n'
    )
    catalog = load_catalog(settings_from_env({"PARLEY_MODELS_FILE": str(path)}, tmp_path))
    spec = catalog.get("o3")
    assert spec is not None
    assert (spec.max_tokens_field, spec.include_usage) == ("max_completion_tokens", False)
    assert spec.tool_call_content == "empty"
    assert choose_model(spec).temperature == 1.0
    path.write_text('[[models]]\nname = "o3"\nmax_tokens_field = "max_output_tokens"\n')
    with pytest.raises(ConfigError, match="max_tokens_field"):
        load_catalog(settings_from_env({"PARLEY_MODELS_FILE": str(path)}, tmp_path))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("[[models]]\nname = 5\n", "name"), ("not toml [", r"models\.toml"), ("", None)],
)
def test_a_broken_models_file_is_a_clear_config_error(
    tmp_path: Path, text: str, fragment: str | None
) -> None:
    path = tmp_path / "models.toml"
    path.write_text(text)
    settings = settings_from_env({"PARLEY_MODELS_FILE": str(path)}, tmp_path)
    if fragment is None:
        assert load_catalog(settings, env={}).default_model == DEMO_MODEL
        return
    with pytest.raises(ConfigError, match=fragment):
        load_catalog(settings, env={})


def _model(versions: str, head: str = "") -> str:
    return f'[[models]]\nname = "m"\n{head}' + versions


def _version(name: str, extra: str = "") -> str:
    return f'  [[models.versions]]\n  version = "{name}"\n{extra}'


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        # a misspelt key would otherwise price the model at 0
        (_model(_version("v1", "  inptu_price = 3.0\n")), "inptu_price"),
        ("[[model]]\nname = 'm'\n", "model"),
        (_model(_version("v1", "  input_price = -5\n")), "input_price"),
        # TOML's inf passes `>= 0`; the turn's `started` would record it as null
        (_model(_version("v1", "  input_price = inf\n")), "input_price inf is not a price"),
        (_model(_version("v1", "  output_price = +inf\n")), "output_price inf is not a price"),
        (_model(_version("v1"), "max_output_tokens = 0\n"), "max_output_tokens"),
        (_model("", 'name = ""\n').replace('name = "m"\n', ""), "name"),
        (_model(_version("v1")) + _model(_version("v1")), "'m' is listed twice"),
        (_model(_version("v1") + _version("v1")), "version 'v1' twice"),
        # two active versions, neither the default nor dated: which is in force?
        (_model(_version("a") + _version("b")), "'a', 'b' tie"),
        (
            _model(
                _version("x1", "  is_default = true\n  release_date = 2026-01-01\n")
                + _version("x2", "  is_default = true\n  release_date = 2026-01-01\n")
            ),
            "'x1', 'x2' tie",
        ),
    ],
)
def test_a_models_file_that_is_ambiguous_or_wrong_is_refused(
    tmp_path: Path, text: str, fragment: str
) -> None:
    path = tmp_path / "models.toml"
    path.write_text(text)
    settings = settings_from_env({"PARLEY_MODELS_FILE": str(path)}, tmp_path)
    with pytest.raises(ConfigError, match=fragment):
        load_catalog(settings, env={})


def test_versions_ordered_by_the_rule_are_not_a_tie(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        _model(
            _version("old", "  release_date = 2025-01-01\n")
            + _version("new", "  release_date = 2026-01-01\n")
            + _version("gone", "  status = 'deprecated'\n")
            + _version("gone-too", "  status = 'deprecated'\n")
        )
    )
    catalog = load_catalog(settings_from_env({"PARLEY_MODELS_FILE": str(path)}, tmp_path), env={})
    spec = catalog.get("m")
    assert spec is not None
    version = active_version(spec)
    assert version is not None and version.version == "new"


def test_a_models_file_that_cannot_be_read_is_a_config_error(tmp_path: Path) -> None:
    latin = tmp_path / "latin.toml"
    latin.write_bytes('[[models]]\nname = "caf\xe9"\n'.encode("latin-1"))
    for path in (latin, tmp_path):  # not UTF-8; a folder
        settings = settings_from_env({"PARLEY_MODELS_FILE": str(path)}, tmp_path)
        with pytest.raises(ConfigError, match="cannot be read"):
            load_catalog(settings, env={})


def test_the_main_providers_key_goes_only_to_the_main_providers_endpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        "[[models]]\nname = 'plain'\n"  # served by PARLEY_MODEL_BASE_URL
        "[[models]]\nname = 'elsewhere'\nbase_url = 'http://other/v1'\n"
        "[[models]]\nname = 'keyed'\napi_key_env = 'UNSET_KEY'\n"
        "[[models]]\nname = 'own'\nbase_url = 'http://own/v1'\napi_key_env = 'OWN_KEY'\n"
    )
    settings = settings_from_env({"PARLEY_MODELS_FILE": str(path)}, tmp_path)
    catalog = load_catalog(settings, env={"OWN_KEY": "sk-own"})
    keys = {}
    for name in ("plain", "elsewhere", "keyed", "own"):
        spec = catalog.get(name)
        assert spec is not None
        keys[name] = endpoint_api_key(spec, "sk-main")
    assert keys == {"plain": "sk-main", "elsewhere": None, "keyed": None, "own": "sk-own"}
    assert "UNSET_KEY is not set" in caplog.text


def test_a_model_named_only_by_parley_model_has_no_price_in_force(tmp_path: Path) -> None:
    settings = settings_from_env({"PARLEY_MODEL": "gpt-x"}, tmp_path)
    spec = load_catalog(settings, env={}).get("gpt-x")
    # so a project's turn on it fails as model_not_priced instead of running free
    assert spec is not None and active_version(spec) is None


def test_a_missing_models_file_is_named_in_the_error(tmp_path: Path) -> None:
    settings = settings_from_env({"PARLEY_MODELS_FILE": str(tmp_path / "nope.toml")}, tmp_path)
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load_catalog(settings, env={})


def test_a_bad_demo_speed_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PARLEY_DEMO_TOKENS_PER_S"):
        settings_from_env({"PARLEY_DEMO_TOKENS_PER_S": "fast"}, tmp_path)
    assert settings_from_env({"PARLEY_DEMO_TOKENS_PER_S": "0"}, tmp_path).demo_tokens_per_s == 0


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"PARLEY_JWT_SECRET": "short"}, "at least 32 characters"),
        ({"PARLEY_JWT_JWKS_URL": "https://idp/jwks"}, "PARLEY_JWT_ISSUER"),
        ({"PARLEY_JWT_AUDIENCE": "x"}, "only with PARLEY_JWT_JWKS_URL"),
        ({"PARLEY_RATE_PER_S": "many"}, "PARLEY_RATE_PER_S must be a number"),
        ({"PARLEY_WRITE_TIMEOUT_S": "0"}, "more than 0"),
        ({"PARLEY_LOG_FORMAT": "xml"}, "text or json"),
        # a webhook secret or URL that cannot work (or would let anyone sign)
        ({**HOOK, "PARLEY_WEBHOOK_SECRET": "whsec_"}, "key of 0 bytes"),
        ({**HOOK, "PARLEY_WEBHOOK_SECRET": "whsec_MfKQ9"}, "not base64"),
        ({**HOOK, "PARLEY_WEBHOOK_SECRET": "whsec_-_-_"}, "not base64"),
        ({**HOOK, "PARLEY_WEBHOOK_SECRET": "c2hvcnQ"}, "key of 5 bytes"),
        # a plain string: the standard's libraries would decode it as base64 (skipping
        # what is not) and check every delivery against another key
        ({**HOOK, "PARLEY_WEBHOOK_SECRET": "a plain secret of some length"}, "not base64"),
        ({**HOOK, "PARLEY_WEBHOOK_URL": "not a url"}, "http:// or https://"),
        ({**HOOK, "PARLEY_WEBHOOK_URL": "ftp://x/hook"}, "http:// or https://"),
        # a URL aiohttp cannot send to (every attempt would fail for ever) or whose host
        # the resolver cannot encode (which raised out of the delivery, every time)
        ({**HOOK, "PARLEY_WEBHOOK_URL": "http://[::1/hook"}, "Invalid IPv6 URL"),
        ({**HOOK, "PARLEY_WEBHOOK_URL": "http://hooks:abc/x"}, "port"),
        ({**HOOK, "PARLEY_WEBHOOK_URL": "http://hooks:99999/x"}, "Port out of range"),
        ({**HOOK, "PARLEY_WEBHOOK_URL": "http://hooks:0/x"}, "port 0"),
        ({**HOOK, "PARLEY_WEBHOOK_URL": "http://hooks..example.com/x"}, "not a host name"),
        ({**HOOK, "PARLEY_WEBHOOK_URL": f"http://{'a' * 64}.example.com/x"}, "not a host name"),
        ({**HOOK, "PARLEY_WEBHOOK_URL": "http://ho oks.example.com/x"}, "not a host name"),
        ({**HOOK, "PARLEY_WEBHOOK_URL": "http://user@/x"}, "http:// or https://"),
    ],
)
def test_settings_that_cannot_work_are_refused_with_the_variable_named(
    tmp_path: Path, env: dict[str, str], says: str
) -> None:
    with pytest.raises(ConfigError, match=says):
        settings_from_env(env, tmp_path)


@pytest.mark.parametrize(
    "name",
    [
        "PARLEY_RATE_PER_S",
        "PARLEY_RATE_BURST",
        "PARLEY_MAX_STREAMS_PER_USER",
        "PARLEY_MAX_TURNS_PER_USER",
        "PARLEY_WRITE_TIMEOUT_S",
        "PARLEY_SHUTDOWN_GRACE_S",
        "PARLEY_APPEND_WINDOW_MS",
        "PARLEY_DEMO_TOKENS_PER_S",
    ],
)
@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "1e400"])
def test_a_number_that_is_not_finite_is_refused_with_the_variable_named(
    tmp_path: Path, name: str, raw: str
) -> None:
    # float() reads these: NaN passed every check, and a count raised out of int()
    with pytest.raises(ConfigError, match=name):
        settings_from_env({name: raw}, tmp_path)


@pytest.mark.parametrize(
    "name", ["PARLEY_RATE_BURST", "PARLEY_MAX_STREAMS_PER_USER", "PARLEY_MAX_TURNS_PER_USER"]
)
def test_a_per_user_cap_is_a_whole_number(tmp_path: Path, name: str) -> None:
    # 0.5 was cut to 0, which means no limit at all
    for bad in ("0.5", "2.5"):
        with pytest.raises(ConfigError, match=f"{name} must be a whole number"):
            settings_from_env({name: bad}, tmp_path)
    limits = settings_from_env({name: "3"}, tmp_path).limits
    assert 3 in (limits.rate_burst, limits.max_streams_per_user, limits.max_turns_per_user)


def test_webhook_urls_aiohttp_can_send_to_are_taken(tmp_path: Path) -> None:
    for url in (
        "http://127.0.0.1:9000/hook",
        "http://[::1]:9000/hook",
        "https://hooks.example.com./parley?tenant=a",
        "http://hook_receiver:8080/in",
        "https://user:pw@bücher.example/hook",
    ):
        settings = settings_from_env({**HOOK, "PARLEY_WEBHOOK_URL": url}, tmp_path)
        assert settings.webhook_url == url


def test_a_standard_webhooks_secret_is_taken_with_or_without_its_prefix_and_padding(
    tmp_path: Path,
) -> None:
    padded = "Zm9yIGEgcmVjZWl2ZXIgb2YgdHVybiBlbmRzLCAzMiBieXQ="  # base64 of 35 bytes, padded
    for secret in (HOOK["PARLEY_WEBHOOK_SECRET"], padded, padded.rstrip("=")):
        settings = settings_from_env({**HOOK, "PARLEY_WEBHOOK_SECRET": secret}, tmp_path)
        assert settings.webhook_secret == secret


def test_the_readiness_lag_bound_is_a_whole_number_of_events(tmp_path: Path) -> None:
    assert settings_from_env({}, tmp_path).max_projection_lag == 10_000
    assert settings_from_env({"PARLEY_MAX_PROJECTION_LAG": "0"}, tmp_path).max_projection_lag == 0
    for bad in ("many", "1.5", "-3"):
        with pytest.raises(ConfigError, match="PARLEY_MAX_PROJECTION_LAG"):
            settings_from_env({"PARLEY_MAX_PROJECTION_LAG": bad}, tmp_path)


def test_stream_replicas_default_to_one_and_allow_what_jetstream_allows(tmp_path: Path) -> None:
    assert settings_from_env({}, tmp_path).stream_replicas == 1
    assert settings_from_env({"PARLEY_STREAM_REPLICAS": "3"}, tmp_path).stream_replicas == 3
    for bad in ("0", "6", "three", "-1", "2.5"):
        with pytest.raises(ConfigError, match="PARLEY_STREAM_REPLICAS"):
            settings_from_env({"PARLEY_STREAM_REPLICAS": bad}, tmp_path)


def test_a_cluster_is_named_by_every_node_in_one_nats_url(tmp_path: Path) -> None:
    url = "nats://n1:4222,nats://n2:4222,nats://n3:4222"
    assert settings_from_env({"PARLEY_NATS_URL": url}, tmp_path).nats_url == url


def test_serve_offers_the_built_in_demo_only_where_it_is_the_default(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(MODELS_TOML)
    named = settings_from_env({"PARLEY_MODELS_FILE": str(path), "PARLEY_MODEL": "house"}, tmp_path)
    served = load_catalog(named, env={}, builtin_demo=False)
    assert served.get(DEMO_MODEL) is None and served.default_model == "house"
    unnamed = settings_from_env({"PARLEY_MODELS_FILE": str(path)}, tmp_path)
    demo = load_catalog(unnamed, env={}, builtin_demo=False)
    assert demo.default_model == DEMO_MODEL and demo.get(DEMO_MODEL) is not None

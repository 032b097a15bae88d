"""The root config is composed of the features' settings, from one list, and reads as it did before.

Before the sections moved into the features, ``appliance/config.py`` declared
every root key itself; the root now inherits each feature's ``*Settings``.
These check the composition (nothing missed, nothing owned twice) and that
what a technician sees did not change: root keys are validated and reported
in the documented order.
"""

from __future__ import annotations

import pytest

from appliance import config
from appliance.errors import ConfigError
from tests.support import configs


def test_the_root_inherits_exactly_the_listed_features() -> None:
    assert config.Config.__bases__ == tuple(f.settings for f in config.FEATURES)


def test_every_root_key_has_one_owner() -> None:
    owned = [key for f in config.FEATURES for key in f.settings.model_fields]
    assert sorted(owned) == sorted(set(owned)) == sorted(config.Config.model_fields)


def test_root_keys_keep_the_documented_order() -> None:
    assert tuple(config.Config.model_fields) == config.KEY_ORDER
    assert config.KEY_ORDER[:3] == ("appliance", "metrics", "sites")


def test_problems_in_several_sections_are_listed_in_key_order() -> None:
    text = configs.valid(
        '[testcalls]\nmin_mos = 9\n[replication]\ncompression = "lz4"\n[channels.a]\ntype = "gsm"\n'
        'device = "/dev/x"\nbaud = 7\n[probes]\nfall = 0\n[appliance]\nfoo = 1\n'
    )
    with pytest.raises(ConfigError) as err:
        config.parse(text)
    roots = [problem.split(".")[0] for problem in err.value.problems]
    assert roots == ["appliance", "probes", "channels", "replication", "testcalls"]


def test_the_root_fits_every_feature_protocol() -> None:
    """Each feature's settings module names what it reads as a Protocol; the root fits each."""
    cfg = configs.parse()
    from appliance.paging.settings import PagingConfig
    from failover.settings import FailoverConfig
    from monitoring.settings import MonitoringConfig

    for protocol in (MonitoringConfig, FailoverConfig, PagingConfig):
        wanted = [name for name in dir(protocol) if not name.startswith("_")]
        assert [name for name in wanted if not hasattr(cfg, name)] == [], protocol.__name__

"""Webhook targets: every IPv6 spelling of a private, loopback or link-local IPv4
address is refused like the IPv4 address itself. Only literals are used, so no name
is resolved and nothing is sent anywhere."""

from __future__ import annotations

import pytest
from django.test import override_settings

from monitoring.adapters import AdapterError, get_channel

REFUSED = [
    "http://[::127.0.0.1]/hook",  # IPv4-compatible
    "http://[::a00:1]/hook",  # IPv4-compatible, hex spelling of 10.0.0.1
    "http://[::ffff:127.0.0.1]/hook",  # IPv4-mapped
    "http://[::ffff:169.254.169.254]/latest",
    "http://[64:ff9b::7f00:1]/hook",  # NAT64 of 127.0.0.1
    "http://[64:ff9b::a9fe:a9fe]/latest",  # NAT64 of 169.254.169.254
    "http://[64:ff9b:1::c0a8:101]/hook",  # local-use NAT64 of 192.168.1.1
    "http://[2002:7f00:1::]/hook",  # 6to4 of 127.0.0.1
    "http://[2002:a9fe:a9fe::1]/latest",  # 6to4 of 169.254.169.254
    "http://[2002:c0a8:101::1]/hook",  # 6to4 of 192.168.1.1
    "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/hook",  # Teredo (client 127.0.0.1)
    "http://[2001:0:4136:e378:8000:63bf:f5ff:fffe]/hook",  # Teredo (client 10.0.0.1)
    "http://[::1]/hook",
    "http://[fe80::1]/hook",
    "http://[fd00::1]/hook",
]


@pytest.mark.parametrize("url", REFUSED)
def test_ipv6_forms_of_private_addresses_are_refused(url):
    with pytest.raises(AdapterError, match="private, loopback or link-local"):
        get_channel("webhook").validate(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://[::ffff:8.8.8.8]/hook",
        "http://[64:ff9b::808:808]/hook",
        "http://[2002:808:808::1]/hook",
        "http://[2606:4700:4700::1111]/hook",
        "http://8.8.8.8/hook",
    ],
)
def test_ipv6_forms_of_public_addresses_pass_the_filter(url):
    get_channel("webhook").validate(url)  # validation only: nothing is sent


@override_settings(CONTROLPLANE_WEBHOOK_ALLOWED_NETWORKS=["127.0.0.1/32"])
def test_the_allow_list_admits_the_ipv4_address_in_any_spelling_and_nothing_else():
    channel = get_channel("webhook")
    channel.validate("http://127.0.0.1:9/hook")
    channel.validate("http://[::ffff:127.0.0.1]:9/hook")
    channel.validate("http://[64:ff9b::7f00:1]:9/hook")
    with pytest.raises(AdapterError):
        channel.validate("http://[2002:a00:1::]/hook")  # 10.0.0.1 is not listed
    with pytest.raises(AdapterError):
        channel.validate("http://[::1]/hook")


def test_delivery_to_a_refused_ipv6_form_is_not_attempted():
    delivery = get_channel("webhook").send(
        "http://[64:ff9b::7f00:1]:9/hook", subject="s", payload={"event_id": 1}, secret="k"
    )
    assert not delivery.ok and delivery.status is None
    assert "private, loopback or link-local" in delivery.error and delivery.attempts == 1

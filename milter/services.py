"""Long-lived things every milter connection shares (policy, keys)."""

from __future__ import annotations

import attrs

from relaylab.dkim.keys import KeyStore
from relaylab.policy.model import Policy
from relaylab.policy.reloader import PolicyHolder


@attrs.define
class Services:
    holder: PolicyHolder
    keys: KeyStore = attrs.field(factory=KeyStore)

    def policy(self) -> Policy:
        return self.holder.policy

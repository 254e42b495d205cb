"""Long-lived things every milter connection shares (policy, keys, Redis)."""

from __future__ import annotations

import attrs

from milter.shared_state import SharedState
from milter.suppression import SuppressionChecker
from relaylab.dkim.keys import KeyLoadError, KeyStore
from relaylab.limits.leases import Lease
from relaylab.policy.model import Policy
from relaylab.policy.reloader import PolicyHolder
from relaylab.tracking.tokens import TokenSigner


@attrs.define
class Services:
    holder: PolicyHolder
    keys: KeyStore = attrs.field(factory=KeyStore)
    shared: SharedState = attrs.field(factory=SharedState)
    # This process's lease: the sessions it serves and the counts it must still confirm
    # are freed by the other workers if it dies (relaylab/limits/leases.py).
    lease: Lease = attrs.field(factory=Lease)
    suppression: SuppressionChecker = attrs.field(
        default=attrs.Factory(lambda self: SuppressionChecker(self.shared), takes_self=True))

    _tokens: tuple[Policy, TokenSigner | None] | None = None

    def policy(self) -> Policy:
        return self.holder.policy

    def tokens(self, policy: Policy) -> TokenSigner | None:
        """The token signer of `policy` (None without a tracker), rebuilt after a reload."""
        if self._tokens is None or self._tokens[0] is not policy:
            t = policy.tracker
            signer = TokenSigner.of(t) if t.enabled else None
            self._tokens = (policy, signer)
        return self._tokens[1]

    def prime_keys(self) -> None:
        """Parse every configured key now, so the first message does not pay for it."""
        for ref in self.holder.policy.all_keys():
            try:
                self.keys.get(ref)
            except KeyLoadError:
                pass  # reported when a message needs it (tempfail), and by the loader

"""Delivery events: Postfix's log parsed (postfix_log), classified (classify), written per
subaccount by relaylab logd (logd/)."""

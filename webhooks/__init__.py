"""relaylab webhooks: signed, batched, retried event webhooks per subaccount."""

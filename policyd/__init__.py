"""Postfix SMTP access policy delegation server enforcing each subaccount's limits."""

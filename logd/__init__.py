"""relaylab logd: follows Postfix's log and writes delivery events per subaccount."""

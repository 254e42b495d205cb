"""relaylab bounces: receives asynchronous bounces (RFC 3464 DSNs) and feedback reports
(RFC 5965 ARF) mailed to the VERP return paths, over LMTP from Postfix."""

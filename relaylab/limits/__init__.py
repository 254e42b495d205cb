"""Per-subaccount limits kept in Redis, shared by policyd (enforcement) and the milter
(session release): key schema, Lua scripts and the sliding-window arithmetic."""

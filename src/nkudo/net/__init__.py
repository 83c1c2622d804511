"""Host networking: rtnetlink codec, link lookup, bridges and TAP devices."""

"""One router per resource: localize, index, health."""

"""One router per resource: web (the page), localize, pairs (why-this-match), index, references, health."""

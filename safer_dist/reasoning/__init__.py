"""The Ex-Ante reasoning format (render, parse, steps) and the rulebook it cites."""

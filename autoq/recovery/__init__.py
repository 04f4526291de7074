"""Quality recovery beyond round-to-nearest: learned rounding per layer (`rounding`), fitted once and cached."""

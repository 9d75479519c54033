//! Client-side tests: see tests/.

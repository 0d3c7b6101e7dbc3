//! Write traces (filled below).

//! Test kit for black-box tests.

//! `[[audiences]] when` trees: compile, check, evaluate, explain.

//! Reward functions and swappable reward modules.

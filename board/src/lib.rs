//! Board support: where state lives on this board and who the board is.

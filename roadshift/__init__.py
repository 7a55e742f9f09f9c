"""roadshift: carry an image classifier from a label-rich domain to a label-scarce one."""

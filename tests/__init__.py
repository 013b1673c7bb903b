"""The engineering tests (one file per concern) and the builders and helpers every test imports."""

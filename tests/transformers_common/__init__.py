"""transformers' own generic tests (ModelTesterMixin, ConfigTester, ImageProcessingTestMixin) run against xT."""

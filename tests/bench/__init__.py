# A package, so that test_expert_parallel.py here and in tests/parallel/ import under different names.

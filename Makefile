# flash — build, test and benchmark.
#
#   make            build the examples
#   make demo       run the demo (memory backend, no server needed)
#   make test       install missing test packages, check every header as C and
#                   C++, a 10 s libFuzzer smoke per harness, the threads test
#                   under TSan, the examples under valgrind, then the Criterion
#                   suite plain and under ASan+UBSan (its Synthesis line last)
#   make fuzz       each libFuzzer harness for FUZZ_SECONDS (default 300)
#   make bench      run the benchmarks against their peers
#   make clean

CC      ?= cc
CXX     ?= c++
BUILD   ?= build
STRICT  := -std=c11 -Wall -Wextra -Wpedantic -Werror
CXXSTRICT := -std=c++17 -Wall -Wextra -Wpedantic -Werror
OPT     ?= -O2 -g
SAN     := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all

# Every library an adapter, test or example may use. The headers only need
# them when the matching adapter header is included. -levent must precede
# -lev: Debian's libev also exports libevent's names (event_add, ...) as a
# compatibility layer, and whichever comes first wins.
ADAPTER_LIBS := -luv -levent -lev -lsqlite3 -lpq
TEST_LIBS    := -lcriterion $(ADAPTER_LIBS) -lmemcached -lpthread -lm

HEADERS      := flash.h $(wildcard backends/*/*.h)
TEST_SRC     := $(wildcard tests/*.c)
EXAMPLE_SRC  := $(wildcard examples/*.c)
EXAMPLES     := $(patsubst examples/%.c,$(BUILD)/examples/%,$(EXAMPLE_SRC))

# Relink the test binaries when a test file is added or removed.
SRCLIST := $(BUILD)/.test-sources
$(shell mkdir -p $(BUILD); echo '$(TEST_SRC)' | cmp -s - $(SRCLIST) 2>/dev/null || echo '$(TEST_SRC)' > $(SRCLIST))

.PHONY: all examples demo test deps headers test-unit test-asan fuzz fuzz-smoke test-tsan valgrind bench clean

all: examples

examples: $(EXAMPLES)

# Each example links only what it uses, so that `make demo` works on a fresh
# machine with nothing but a C compiler: EXAMPLE_LIBS_<name>, default all.
EXAMPLE_LIBS_demo := -lpthread
EXAMPLE_LIBS_memcached_app := -lpthread -lm
EXAMPLE_LIBS_resolvers := -lpthread -lm
EXAMPLE_LIBS_http_server := -luv -lsqlite3 -lpq -lpthread -lm
EXAMPLE_LIBS_invalidator := -lpq -lpthread -lm

$(BUILD)/examples/%: examples/%.c $(HEADERS) | $(BUILD)/examples
	$(CC) $(STRICT) $(OPT) -I. $< -o $@ $(or $(EXAMPLE_LIBS_$*),$(ADAPTER_LIBS) -lpthread -lm)

demo: $(BUILD)/examples/demo
	./$(BUILD)/examples/demo

# ---- tests ------------------------------------------------------------------

# The Criterion suites run last, so that the final line is their Synthesis.
test: deps headers fuzz-smoke test-tsan valgrind test-unit test-asan

deps:
	@./tests/deps.sh

# Compile-only check: each header alone, then all with the implementation,
# as C and as C++.
headers: | $(BUILD)/headers
	@set -e; for h in $(HEADERS); do \
	  printf '#include "%s"\n' "$$h" > $(BUILD)/headers/one.c; \
	  $(CC) $(STRICT) -I. -fsyntax-only $(BUILD)/headers/one.c; \
	  $(CXX) $(CXXSTRICT) -I. -fsyntax-only -x c++ $(BUILD)/headers/one.c; \
	done; \
	{ echo '#define FLASH_IMPLEMENTATION'; for h in $(HEADERS); do printf '#include "%s"\n' "$$h"; done; } \
	  > $(BUILD)/headers/all.c; \
	$(CC) $(STRICT) -I. -fsyntax-only $(BUILD)/headers/all.c; \
	$(CXX) $(CXXSTRICT) -I. -fsyntax-only -x c++ $(BUILD)/headers/all.c; \
	echo "headers: $(words $(HEADERS)) headers compile as C11 and C++17, alone and with the implementation"; \
	$(CC) $(STRICT) -I. tests/compile/feature_macros.c -o $(BUILD)/headers/feature_macros -lpthread; \
	./$(BUILD)/headers/feature_macros; \
	$(CC) $(STRICT) -I. tests/compile/default_timeout.c -o $(BUILD)/headers/default_timeout -lpthread; \
	./$(BUILD)/headers/default_timeout; \
	CC=$(CC) CXX=$(CXX) BUILD=$(BUILD) ./tests/compile/task_switches.sh

$(BUILD)/tests/flash_tests: $(TEST_SRC) $(SRCLIST) $(wildcard tests/*.h) $(HEADERS) | $(BUILD)/tests
	$(CC) $(STRICT) $(OPT) -I. $(TEST_SRC) -o $@ $(TEST_LIBS)

$(BUILD)/asan/flash_tests: $(TEST_SRC) $(SRCLIST) $(wildcard tests/*.h) $(HEADERS) | $(BUILD)/asan
	$(CC) $(STRICT) $(SAN) -I. $(TEST_SRC) -o $@ $(TEST_LIBS)

# tests/test_http.c drives the HTTP example as a real server process.
TEST_BINARIES := $(BUILD)/examples/http_server

test-unit: $(BUILD)/tests/flash_tests $(TEST_BINARIES)
	@echo "== Criterion suite"
	FLASH_HTTP_SERVER=$(BUILD)/examples/http_server ./$(BUILD)/tests/flash_tests --jobs 2 2>&1

test-asan: $(BUILD)/asan/flash_tests $(TEST_BINARIES)
	@echo "== Criterion suite under ASan+UBSan"
	FLASH_HTTP_SERVER=$(BUILD)/examples/http_server \
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=1 UBSAN_OPTIONS=print_stacktrace=1 \
	  ./$(BUILD)/asan/flash_tests --jobs 2 2>&1

# libFuzzer harnesses in tests/fuzz (clang): the codec and header decoder, the
# key builder, the memcached reply parser. Crashes land in tests/fuzz/crashes.
FUZZ_SECONDS ?= 300
fuzz:
	FUZZ_JOBS=2 ./tests/fuzz/run.sh $(FUZZ_SECONDS)

fuzz-smoke:
	@echo "== libFuzzer smoke (10 s per harness)"
	@FUZZ_JOBS=2 ./tests/fuzz/run.sh 10

# Several threads, each with its own contexts, against one memcached.
test-tsan:
	@echo "== threads under ThreadSanitizer"
	@CC=$(CC) ./tests/tsan.sh

# Every example under valgrind memcheck; any report fails.
valgrind: examples
	@echo "== examples under valgrind"
	@VALGRIND_NO_BUILD=1 ./tests/valgrind.sh

# ---- benchmarks ---------------------------------------------------------------

bench:
	@$(MAKE) -s -C bench

clean:
	rm -rf $(BUILD)

$(BUILD)/examples $(BUILD)/tests $(BUILD)/asan $(BUILD)/headers:
	mkdir -p $@

# hotsite: the two commands a newcomer needs are `make demo` and `make test`.
# Both install what they need first (Debian packages as root, then a virtualenv).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
APT_PACKAGES := kamailio sip-tester iproute2 nftables openssl etcd-server etcd-client prometheus tmux openssh-server debootstrap vagrant procps python3-venv fdisk mtools dosfstools
# Stamp files make the install steps run once, and again when their inputs change.
APT_STAMP := $(VENV)/.apt-installed
PIP_STAMP := $(VENV)/.pip-installed

.PHONY: demo test test-stress unit lint typecheck deps venv clean lab-down image test-image

demo: deps venv
	$(BIN)/hotsite lab demo

# The whole suite, then the appliance image booted under QEMU (test-image): what CI runs
# (.ci/run). Each part prints how long it took.
test: deps venv lint typecheck
	@started=$$(date +%s); $(BIN)/pytest; rc=$$?; \
	    echo "make test: pytest $$(( $$(date +%s) - started ))s"; exit $$rc
	@$(MAKE) --no-print-directory test-image

# The integration tests with one busy process per core beside them, as on a loaded CI runner
# (tests/stress.py): what must hold under load, not only on an idle machine.
test-stress: deps venv
	$(BIN)/python -m tests.stress -- $(BIN)/pytest tests/integration

unit: venv
	$(BIN)/pytest tests/unit

# The appliance image built (its bare debootstrap kept as a tarball in HOTSITE_IMAGE_CACHE) and
# booted under QEMU, every feature run under the real unit (root, network; 9-12 minutes, see README).
test-image: deps venv
	@started=$$(date +%s); HOTSITE_SLOW_TESTS=1 $(BIN)/pytest -s tests/integration/test_appliance_image.py; \
	    rc=$$?; echo "make test-image: $$(( $$(date +%s) - started ))s"; exit $$rc

lint: venv
	$(BIN)/ruff check appliance failover monitoring provisioning tests
	cd provisioning/ansible && ../../$(BIN)/ansible-lint --offline -q site.yml roles

typecheck: venv
	$(BIN)/mypy

deps: $(APT_STAMP)

$(APT_STAMP):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	    if [ -n "$$missing" ]; then \
	        echo "installing Debian packages: $$missing"; \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	    fi; \
	else \
	    echo "not root or no apt-get: skipping Debian packages ($(APT_PACKAGES)); lab tests will be skipped"; \
	fi
	@mkdir -p $(VENV) && touch $@

venv: $(PIP_STAMP)

$(PIP_STAMP): pyproject.toml
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

# build/image/hotsite.img: a bootable disk (UEFI, GPT) of Debian 12 + the appliance role
# (root, debootstrap, network; minutes). See images/README.md. VARS=my-site-vars.yml.
image: deps venv
	@command -v sfdisk >/dev/null && command -v mcopy >/dev/null && command -v mkfs.vfat >/dev/null || \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends fdisk mtools dosfstools
	rm -rf build/wheels && $(BIN)/pip wheel -q . -w build/wheels
	images/build-rootfs.sh build/image build/wheels $${VARS:-provisioning/ansible/vagrant-vars.yml}
	images/build-disk.sh build/image/rootfs build/image/hotsite.img

lab-down: venv
	$(BIN)/hotsite lab down

clean: lab-down
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis

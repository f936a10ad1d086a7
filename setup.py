"""hostagent: per-host daemon attaching shared block volumes to libvirt guests."""

from setuptools import find_packages, setup

setup(
    name="hostagent",
    version="0.1.0",
    description=(
        "Per-compute-host daemon that connects shared volumes once per host "
        "and attaches them to libvirt/QEMU guests"
    ),
    python_requires=">=3.11",
    packages=find_packages(include=["hostagent", "hostagent.*"]),
    package_data={"hostagent": ["py.typed"]},
    install_requires=[
        "libvirt-python>=9.0",
        "os-brick>=6.0",
        "oslo.concurrency>=5.0",
        "oslo.config>=9.0",
        "lxml>=4.9",
        "pyroute2>=0.7",
        "aiohttp>=3.9",
        "pydantic>=2.5",
        "prometheus-client>=0.17",
        "inotify_simple>=1.3",
    ],
    extras_require={
        # journald output (oslo.log use_journal); builds against libsystemd-dev
        "journal": ["systemd-python>=235"],
        "test": [
            "systemd-python>=235",
            "schemathesis>=4.0",
            "requests>=2.31",
            "pytest>=7",
            "mypy>=1.8",
            "ruff>=0.4",
            "lxml-stubs",
        ],
    },
    entry_points={
        "console_scripts": [
            "hostagentd = hostagent.daemon.main:main",
            "hostagentctl = hostagent.cli:main",
        ],
        "oslo.config.opts": ["hostagent = hostagent.daemon.conf:list_opts"],
        "oslo.config.opts.defaults": ["hostagent = hostagent.daemon.conf:update_log_defaults"],
    },
)

"""ament_python-compatible setup: works with `colcon build` and with `pip install -e .`."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = 'malmm_ros'

setup(
    name=PACKAGE,
    version='0.1.0',
    python_requires='>=3.10',
    packages=find_packages(include=[PACKAGE, f'{PACKAGE}.*']),
    data_files=[
        ('share/ament_index/resource_index/packages', [f'resource/{PACKAGE}']),
        (f'share/{PACKAGE}', ['package.xml']),
        (f'share/{PACKAGE}/launch', glob('launch/*.launch.py')),
        (f'share/{PACKAGE}/config', glob('config/*.yaml')),
        (f'share/{PACKAGE}/config', glob('config/*.xml')),
        # `ros2 run malmm_ros anticipate` looks in lib/<package>; a data file keeps the console
        # scripts below in the venv's bin for `pip install -e .` (no setup.cfg script_dir).
        (f'lib/{PACKAGE}', ['scripts/anticipate']),
    ],
    install_requires=['setuptools'],
    extras_require={'tensorrt': ['tensorrt>=10']},
    zip_safe=True,
    maintainer='malmm_ros maintainers',
    maintainer_email='maintainers@malmm-ros.invalid',
    description='Online action anticipation with MA-LMM long-term memory for ROS 2.',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'malmm-demo = malmm_ros.ros.demo:main',
            'malmm-pipeline-demo = malmm_ros.cli.pipeline_demo:main',
            'malmm-make-bag = malmm_ros.cli.make_bag:main',
            'malmm-replay = malmm_ros.ros.replay:main',
            'malmm-anticipate = malmm_ros.ros.anticipate_main:main',
            'malmm-export = malmm_ros.cli.export:main',
            'malmm-extract = malmm_ros.cli.extract:main',
            'malmm-train = malmm_ros.cli.train:main',
            'malmm-eval = malmm_ros.cli.evaluate:main',
        ],
    },
)

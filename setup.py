"""ament_python-compatible setup: works with `colcon build` and with `pip install -e .`."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = 'malmm_ros'

setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(include=[PACKAGE, f'{PACKAGE}.*']),
    data_files=[
        ('share/ament_index/resource_index/packages', [f'resource/{PACKAGE}']),
        (f'share/{PACKAGE}', ['package.xml']),
        (f'share/{PACKAGE}/launch', glob('launch/*.launch.py')),
        (f'share/{PACKAGE}/config', glob('config/*.yaml')),
    ],
    install_requires=['setuptools'],
    extras_require={'tensorrt': ['tensorrt>=10']},
    zip_safe=True,
    maintainer='malmm_ros maintainers',
    maintainer_email='maintainers@malmm-ros.invalid',
    description='Online action anticipation with MA-LMM long-term memory for ROS 2.',
    license='Apache-2.0',
    tests_require=['pytest'],
    entry_points={
        'console_scripts': [
            'malmm-demo = malmm_ros.cli.demo:main',
        ],
    },
)

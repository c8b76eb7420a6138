"""malmm_anticipate as a managed (lifecycle) node, for bring-ups that sequence their nodes.

States and what each holds (docs/ARCHITECTURE.md has the picture):
- unconfigured: the parameters and the lifecycle services only; nothing loaded.
- configure: the config is read from the parameters and checked, the model, encoder and
  describer load, the publishers, ~/reset and /diagnostics start. Any failure makes the
  transition fail with the reason logged; the node stays unconfigured and alive, so a fixed
  parameter and a second configure succeed.
- active: subscribed to the camera; predictions and descriptions publish.
- deactivate: unsubscribes and stops the worker after its current step; the memory, the sampling
  grid and the counters stay, so activating again continues the same stream.
- cleanup: releases the model, the encoder (TensorRT buffers too) and the describer.
- shutdown (from any state) and Ctrl-C: stop the threads and release everything.

The plain node (ros/anticipate_node.py) stays the default; both share AnticipationMixin.
"""

from __future__ import annotations

import gc

from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from malmm_ros.errors import MalmmError
from malmm_ros.ros.anticipate_node import AnticipationMixin, DescriptionWorker
from malmm_ros.ros.diagnostics import NodeStats
from malmm_ros.ros.parameters import (
    config_from_parameters,
    declare_config_parameters,
    refuse_unknown_parameters,
)

__all__ = ['ManagedAnticipateNode']


class ManagedAnticipateNode(AnticipationMixin, LifecycleNode):
    """The anticipation node driven through lifecycle transitions (see the module docstring)."""

    def __init__(self, dds_note: str = 'DDS: the environment\'s settings') -> None:
        super().__init__('malmm_anticipate')
        self._init_state(dds_note)
        self._lifecycle = 'unconfigured'
        # A value that cannot even be declared (a string for an integer) is kept and reported by
        # configure: the node must come up, unconfigured, for a bring-up to see the reason.
        self._declare_error: str | None = None
        try:
            declare_config_parameters(self)
        except MalmmError as exc:
            self._declare_error = str(exc)
        self.add_on_set_parameters_callback(self.parameters_callback)
        self.get_logger().info('managed node: unconfigured; configure loads the model, '
                               'activate starts taking frames')

    # -- transitions ------------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            if self._declare_error:
                raise MalmmError(f'{self._declare_error}; fix the parameter file and restart')
            refuse_unknown_parameters(self)
            config = config_from_parameters(self)
            self.config = config
            self.pipeline, describer = self._load(config)
        except MalmmError as exc:
            self.get_logger().error(f'configure failed: {exc}')
            self.pipeline = None
            return TransitionCallbackReturn.FAILURE
        except Exception as exc:  # rclpy would swallow it without a word
            self.get_logger().error(f'configure failed: {exc!r}')
            self.pipeline = None
            return TransitionCallbackReturn.FAILURE
        self.stats = NodeStats()
        self._resolve_input()
        self._open_outputs(managed=True)
        self.text = DescriptionWorker(describer, self._publish_description,
                                      self._description_failed)
        self._publish_labels()
        self._log_describer(describer)
        self._lifecycle = 'inactive'
        self.get_logger().info(f'configured: {self.pipeline.model_name} on '
                               f'{self.pipeline.encoder.name}; activate to take frames')
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)  # the lifecycle publishers first
        if result != TransitionCallbackReturn.SUCCESS:
            return result
        self._open_input()
        self._lifecycle = 'active'
        self._log_listening()
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._close_input()  # no step can publish once the publishers are off
        self._lifecycle = 'inactive'
        self.get_logger().info('deactivated: not taking frames; the memory stays')
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self.get_logger().info('cleaned up: model released')
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self._lifecycle = 'finalized'
        return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f'error in {state.label}: releasing the model')
        self._release()
        return TransitionCallbackReturn.SUCCESS  # back to unconfigured

    # -- helpers ----------------------------------------------------------------------------

    def _release(self) -> None:
        """Stop the threads and drop the model and every topic of the configured states."""
        self._close_input()
        if self.text is not None:
            self.text.stop()
            self.text = None
        self._close_outputs()
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            pipeline.close()
        del pipeline
        self._last_prediction = None
        self._lifecycle = 'unconfigured'
        gc.collect()  # the model's arrays go now, not at some later collection

    def _state_values(self) -> dict[str, object]:
        return {'lifecycle_state': self._lifecycle}

    def stop(self) -> None:
        """Ctrl-C or the end of spin: release whatever the current state holds."""
        self._release()


/** OHIF 3.13 configuration for UniCT Node's viewer harness (deploy/viewer/serve.py).
 *
 * One data source: the PACS's DICOMweb, reached on the same origin at /dicom-web, where
 * serve.py proxies it (and adds the PACS credentials, so the browser never holds them).
 * Everything else is OHIF's secure default: no local files, no ?url= sources, no
 * URL-loaded configuration or customizations.
 */
// Absolute URLs on the page's own origin: the proxy serves the viewer and /dicom-web alike.
const dicomWebRoot = window.location.origin + '/dicom-web';

window.config = {
  name: 'unict-node',
  routerBasename: null,
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  // No "investigational use" dialog or other first-run prompts in the way of the reader.
  investigationalUseDialog: { option: 'never' },
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 10 },
  showErrorDetails: 'always',
  defaultDataSourceName: 'pacs',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'pacs',
      configuration: {
        friendlyName: 'PACS (DICOMweb through the UniCT viewer proxy)',
        name: 'pacs',
        wadoUriRoot: dicomWebRoot,
        qidoRoot: dicomWebRoot,
        wadoRoot: dicomWebRoot,
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
